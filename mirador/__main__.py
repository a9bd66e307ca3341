from mirador.cli import main

main()
