"""Fast ops, each next to a plain-torch reference it is tested against. Imports nothing of ours."""
