"""processor.media: the SSRF address filter (pure function), MediaFetcher (data:, local files, http from a server
on 127.0.0.1 only), decode_image, image_size (headers only) and content_key.

Network rule: nothing here connects anywhere but loopback. Blocked ranges are tested through the pure function;
the fetcher's guard is tested with names that resolve to loopback ("localhost", "127.0.0.1", "[::1]", ...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

import processor.media as media
from common.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, http_status
from common.ports import free_port
from processor.media import MediaFetcher, MediaPolicy, blocked_address, content_key, decode_image, image_size

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"


# ---------------------------------------------------------------------------------------------- helpers


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


SMALL_PNG = png_bytes(Image.new("RGB", (3, 2), (10, 20, 30)))


def fetch(policy: MediaPolicy, url: str) -> bytes:
    async def go():
        f = MediaFetcher(policy)
        try:
            return await f.fetch(url, param="messages[0].content[0].image_url")
        finally:
            await f.aclose()

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------- blocked_address


class TestBlockedAddress:
    @pytest.mark.parametrize(
        "ip",
        [
            "127.0.0.1",
            "127.255.255.254",
            "::1",  # loopback
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",  # private v4
            "fc00::1",
            "fd12:3456::1",  # unique local v6
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fe80::1%eth0",  # link-local (cloud metadata)
            "100.64.0.1",
            "100.127.255.254",  # CGNAT / shared
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "ff05::1:3",  # multicast
            "240.0.0.1",
            "255.255.255.255",  # reserved / broadcast
            "0.0.0.0",
            "::",  # unspecified
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:100.64.0.1",  # v4-mapped
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "2001:db8::1",  # documentation
            "198.18.0.1",
            "fec0::1",  # benchmarking, site-local
        ],
    )
    def test_blocked(self, ip):
        reason = blocked_address(ip)
        assert reason, f"{ip} must be refused"
        assert isinstance(reason, str)

    @pytest.mark.parametrize(
        "ip,reason",
        [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("100.64.0.1", "shared"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
        ],
    )
    def test_reason_names_the_range(self, ip, reason):
        assert blocked_address(ip) == reason

    @pytest.mark.parametrize(
        "ip",
        [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "151.101.1.69",
            "100.63.255.255",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ],
    )
    def test_public_allowed(self, ip):
        assert blocked_address(ip) is None


# ---------------------------------------------------------------------------------------------- data: URIs


class TestDataUri:
    def test_valid(self):
        assert fetch(MediaPolicy(), data_uri(SMALL_PNG)) == SMALL_PNG

    def test_mime_type_case_and_extra_params(self):
        url = "data:IMAGE/PNG;charset=utf-8;BASE64," + base64.b64encode(SMALL_PNG).decode()
        assert fetch(MediaPolicy(), url) == SMALL_PNG

    @pytest.mark.parametrize("payload", ["not base64!!", "abc", "QUJD=\u00e9", "QUJ$RA=="])
    def test_invalid_base64(self, payload):
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(), "data:image/png;base64," + payload)
        assert e.value.param == "messages[0].content[0].image_url"
        assert http_status(e.value) == 400

    @pytest.mark.parametrize("url", ["data:image/png,rawbytes", "data:,hello", "data:image/png;base64"])
    def test_non_base64_or_malformed(self, url):
        with pytest.raises(InvalidRequestError):
            fetch(MediaPolicy(), url)

    def test_over_cap(self):
        data = os.urandom(1001)
        with pytest.raises(PayloadTooLargeError) as e:
            fetch(MediaPolicy(max_bytes=1000), data_uri(data))
        assert http_status(e.value) == 413

    def test_just_under_cap(self):
        data = os.urandom(999)
        assert fetch(MediaPolicy(max_bytes=1000), data_uri(data)) == data

    @pytest.mark.parametrize("n", [1000, 998])
    def test_exactly_at_cap_is_accepted(self, n):
        """A payload of max_bytes bytes is within the cap (as it is for http and local files). The base64
        length estimate must not count the '=' padding as data."""
        data = os.urandom(n)
        assert fetch(MediaPolicy(max_bytes=n), data_uri(data)) == data

    def test_empty_url(self):
        with pytest.raises(InvalidRequestError):
            fetch(MediaPolicy(), "")

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://localhost/a.png",
            "gopher://localhost/",
            "javascript:alert(1)",
            "blob:abc",
            "ws://localhost/x",
        ],
    )
    def test_unsupported_scheme(self, url):
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(allow_private_urls=True, allowed_local_media_path="/"), url)
        assert "scheme" in e.value.message


# ---------------------------------------------------------------------------------------------- local files


@pytest.fixture
def media_dirs(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(SMALL_PNG)
    (root / "sub" / "b.png").write_bytes(SMALL_PNG + b"b")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    sibling = tmp_path / "media-evil"  # shares the root's name as a string prefix
    sibling.mkdir()
    (sibling / "c.png").write_bytes(b"evil")
    (root / "escape.png").symlink_to(outside)
    (root / "inner_link.png").symlink_to(root / "a.png")
    (root / "dir_link").symlink_to(tmp_path)
    return root, outside, sibling


class TestLocalFiles:
    def test_disabled_by_default(self, media_dirs):
        root, _, _ = media_dirs
        for url in (str(root / "a.png"), f"file://{root / 'a.png'}"):
            with pytest.raises(InvalidRequestError) as e:
                fetch(MediaPolicy(), url)
            assert "disabled" in e.value.message

    def test_allowed_dir(self, media_dirs):
        root, _, _ = media_dirs
        policy = MediaPolicy(allowed_local_media_path=str(root))
        assert fetch(policy, str(root / "a.png")) == SMALL_PNG
        assert fetch(policy, f"file://{root / 'a.png'}") == SMALL_PNG
        assert fetch(policy, str(root / "sub" / "b.png")) == SMALL_PNG + b"b"
        assert fetch(policy, str(root / "sub" / ".." / "a.png")) == SMALL_PNG
        assert fetch(policy, str(root / "inner_link.png")) == SMALL_PNG

    def test_percent_encoded_file_url(self, tmp_path):
        root = tmp_path / "with space"
        root.mkdir()
        (root / "é x.png").write_bytes(SMALL_PNG)
        policy = MediaPolicy(allowed_local_media_path=str(root))
        assert fetch(policy, "file://" + str(root / "é x.png").replace(" ", "%20")) == SMALL_PNG

    @pytest.mark.parametrize(
        "which",
        [
            "outside",
            "dotdot",
            "dotdot_file_url",
            "symlink",
            "dir_symlink",
            "sibling_prefix",
            "etc_passwd",
            "root_parent",
        ],
    )
    def test_refused(self, media_dirs, which):
        root, outside, sibling = media_dirs
        url = {
            "outside": str(outside),
            "dotdot": f"{root}/../secret.png",
            "dotdot_file_url": f"file://{root}/sub/../../secret.png",
            "symlink": str(root / "escape.png"),
            "dir_symlink": str(root / "dir_link" / "secret.png"),
            "sibling_prefix": str(sibling / "c.png"),
            "etc_passwd": "/etc/passwd",
            "root_parent": str(root.parent),
        }[which]
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(allowed_local_media_path=str(root)), url)
        assert "outside" in e.value.message

    def test_missing_inside_is_not_found(self, media_dirs):
        root, _, _ = media_dirs
        policy = MediaPolicy(allowed_local_media_path=str(root))
        with pytest.raises(NotFoundError) as e:
            fetch(policy, str(root / "nope.png"))
        assert http_status(e.value) == 404
        with pytest.raises(NotFoundError):
            fetch(policy, str(root / "sub"))  # a directory is not an image file

    def test_over_cap(self, media_dirs):
        root, _, _ = media_dirs
        (root / "big.png").write_bytes(b"\0" * 2000)
        with pytest.raises(PayloadTooLargeError):
            fetch(MediaPolicy(allowed_local_media_path=str(root), max_bytes=1999), str(root / "big.png"))
        assert (
            len(fetch(MediaPolicy(allowed_local_media_path=str(root), max_bytes=2000), str(root / "big.png")))
            == 2000
        )


# ---------------------------------------------------------------------------------------------- http (loopback)

BIG = b"x" * 5000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?", 1)[0]
        srv.hits.append((path, self.headers.get("Host")))
        port = srv.server_address[1]
        if path == "/img.png":
            self._send(200, SMALL_PNG, {"Content-Type": "image/png"})
        elif path == "/redirect":
            self._send(302, headers={"Location": "/img.png"})
        elif path == "/redirect-abs":
            self._send(301, headers={"Location": f"http://127.0.0.1:{port}/img.png"})
        elif path == "/redirect-chain":
            self._send(307, headers={"Location": "/redirect"})
        elif path == "/redirect-loop":
            self._send(302, headers={"Location": "/redirect-loop"})
        elif path == "/redirect-other-loopback":  # 127.0.0.2 is loopback too: the patched filter blocks it
            self._send(302, headers={"Location": f"http://127.0.0.2:{port}/img.png"})
        elif path == "/redirect-v6":
            self._send(302, headers={"Location": f"http://[::1]:{port}/img.png"})
        elif path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif path == "/missing":
            self._send(404, b"not found")
        elif path == "/error":
            self._send(500, b"boom")
        elif path == "/big":
            self._send(200, BIG)
        elif path == "/big-undeclared":  # no Content-Length: the body ends at close
            self._send(200, BIG, length=False)
        elif path == "/big-lying":  # declares a small length but the cap applies to what arrives
            self._send(200, BIG[:100], headers={"Content-Length": "100"}, length=False)
        elif path == "/slow":
            time.sleep(4)
            self._send(200, SMALL_PNG)
        elif (
            path == "/drip"
        ):  # headers at once, then a byte every 0.1 s: each read is quick, the total is not
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.hits = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server):
    server.hits.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def vet_only_127_0_0_1(monkeypatch):
    """Let the SSRF guard treat 127.0.0.1 as public while every other address keeps its verdict: this exercises
    the vetted-IP connection path and the re-check on redirects without any non-loopback traffic."""
    real = media.blocked_address
    monkeypatch.setattr(media, "blocked_address", lambda ip: None if ip == "127.0.0.1" else real(ip))


PRIVATE_OK = MediaPolicy(allow_private_urls=True, fetch_timeout_s=5)


class TestHttp:
    @pytest.mark.parametrize(
        "host",
        [
            "127.0.0.1",
            "localhost",
            "[::1]",
            "127.1",
            "2130706433",
            "0.0.0.0",
            "LOCALHOST",
            "[::ffff:127.0.0.1]",
        ],
    )
    def test_loopback_blocked_by_default(self, server, base, host):
        port = server.server_address[1]
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(), f"http://{host}:{port}/img.png")
        assert e.value.code == "media_url_blocked"
        assert http_status(e.value) == 400
        assert server.hits == [], "the guard must refuse before connecting"

    def test_https_loopback_blocked(self, server, base):
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(), f"https://localhost:{server.server_address[1]}/img.png")
        assert e.value.code == "media_url_blocked"

    def test_userinfo_does_not_hide_the_host(self, server, base):
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(), f"http://8.8.8.8@127.0.0.1:{server.server_address[1]}/img.png")
        assert e.value.code == "media_url_blocked"
        assert server.hits == []

    def test_allowed_with_allow_private_urls(self, server, base):
        assert fetch(PRIVATE_OK, f"{base}/img.png") == SMALL_PNG
        port = server.server_address[1]
        assert fetch(PRIVATE_OK, f"http://localhost:{port}/img.png") == SMALL_PNG

    def test_vetted_ip_path_sends_host_header(self, server, base, vet_only_127_0_0_1):
        assert fetch(MediaPolicy(fetch_timeout_s=5), f"{base}/img.png") == SMALL_PNG
        assert server.hits[-1] == ("/img.png", f"127.0.0.1:{server.server_address[1]}")

    @pytest.mark.parametrize("path", ["/redirect", "/redirect-abs", "/redirect-chain"])
    def test_redirect_followed(self, server, base, path):
        assert fetch(PRIVATE_OK, base + path) == SMALL_PNG
        assert server.hits[-1][0] == "/img.png"

    @pytest.mark.parametrize("path", ["/redirect", "/redirect-abs", "/redirect-chain"])
    def test_redirect_followed_on_vetted_path(self, server, base, vet_only_127_0_0_1, path):
        assert fetch(MediaPolicy(fetch_timeout_s=5), base + path) == SMALL_PNG

    @pytest.mark.parametrize("path", ["/redirect-other-loopback", "/redirect-v6"])
    def test_redirect_target_rechecked(self, server, base, vet_only_127_0_0_1, path):
        """The first hop is allowed (127.0.0.1 vetted as public); the Location points at a blocked address,
        which must be refused before any connection to it."""
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(fetch_timeout_s=5), base + path)
        assert e.value.code == "media_url_blocked"
        assert [h[0] for h in server.hits] == [path]

    def test_redirect_to_file_scheme_refused(self, server, base):
        for policy in (PRIVATE_OK, MediaPolicy(allow_private_urls=True, allowed_local_media_path="/")):
            with pytest.raises(InvalidRequestError):
                fetch(policy, base + "/redirect-file")

    def test_redirect_loop(self, server, base):
        with pytest.raises(InvalidRequestError) as e:
            fetch(PRIVATE_OK, base + "/redirect-loop")
        assert "redirect" in e.value.message
        assert 2 <= len(server.hits) <= 10

    @pytest.mark.parametrize("path,status", [("/missing", 404), ("/error", 500)])
    def test_http_error_status(self, server, base, path, status):
        with pytest.raises(InvalidRequestError) as e:
            fetch(PRIVATE_OK, base + path)
        assert str(status) in e.value.message
        assert e.value.code == "media_fetch_failed"
        assert http_status(e.value) == 400

    @pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
    def test_body_over_cap(self, server, base, path):
        with pytest.raises(PayloadTooLargeError):
            fetch(
                MediaPolicy(allow_private_urls=True, max_bytes=len(BIG) - 1, fetch_timeout_s=5), base + path
            )
        assert (
            fetch(MediaPolicy(allow_private_urls=True, max_bytes=len(BIG), fetch_timeout_s=5), base + path)
            == BIG
        )

    def test_connection_refused(self):
        port = free_port()  # nothing listens there now
        with pytest.raises(InvalidRequestError) as e:
            fetch(PRIVATE_OK, f"http://127.0.0.1:{port}/img.png")
        assert e.value.code == "media_fetch_failed"

    @pytest.mark.parametrize("path", ["/slow", "/drip"])
    def test_timeout(self, server, base, path):
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError) as e:
            fetch(MediaPolicy(allow_private_urls=True, fetch_timeout_s=0.5), base + path)
        elapsed = time.monotonic() - t0
        assert e.value.code == "media_fetch_timeout"
        assert elapsed < 2.5, f"the 0.5 s fetch timeout took {elapsed:.2f} s"

    @pytest.mark.parametrize(
        "url",
        ["http://localhost:99999/a.png", "http://localhost:port/a.png", "http://[::1/a.png", "http:///a.png"],
    )
    def test_malformed_url_is_a_bad_request(self, url):
        """A malformed URL is the client's error (400), not an unhandled ValueError (500)."""
        for policy in (
            MediaPolicy(fetch_timeout_s=2),
            MediaPolicy(allow_private_urls=True, fetch_timeout_s=2),
        ):
            with pytest.raises(InvalidRequestError):
                fetch(policy, url)


# ---------------------------------------------------------------------------------------------- decode_image


class TestDecodeImage:
    def test_grace_hopper_jpeg(self):
        data = (SAMPLE_DATA / "grace_hopper.jpg").read_bytes()
        d = decode_image(data)
        assert (d.width, d.height) == (512, 600)
        assert d.image.size == (512, 600)
        assert d.image.mode == "RGB"
        assert d.image.getpixel((256, 300)) == Image.open(io.BytesIO(data)).convert("RGB").getpixel(
            (256, 300)
        )

    def test_logo_png_alpha_on_white(self):
        data = (SAMPLE_DATA / "logo2.png").read_bytes()
        src = Image.open(io.BytesIO(data))
        assert src.mode == "RGBA"
        d = decode_image(data)
        assert (d.width, d.height) == src.size == d.image.size
        assert d.image.mode == "RGB"
        assert src.getpixel((0, 0))[3] == 0
        assert d.image.getpixel((0, 0)) == (255, 255, 255)
        # an opaque pixel keeps its colour
        opaque = next(
            (x, y) for y in range(src.height) for x in range(src.width) if src.getpixel((x, y))[3] == 255
        )
        assert d.image.getpixel(opaque) == src.getpixel(opaque)[:3]

    def test_semi_transparent_composited(self):
        img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
        img.putpixel((1, 0), (0, 0, 0, 128))
        d = decode_image(png_bytes(img))
        assert d.image.getpixel((0, 0)) == (255, 255, 255)
        assert all(120 <= c <= 135 for c in d.image.getpixel((1, 0)))

    @pytest.mark.parametrize("mode", ["LA", "P"])
    def test_other_transparent_modes_on_white(self, mode):
        if mode == "LA":
            img = Image.new("LA", (2, 2), (0, 0))
        else:
            img = Image.new("P", (2, 2), 0)
            img.putpalette([0, 0, 0] * 256)
            img.info["transparency"] = 0
        d = decode_image(encode(img, "PNG", **({"transparency": 0} if mode == "P" else {})))
        assert d.image.getpixel((0, 0)) == (255, 255, 255)

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"hello world",
            b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
            b"GIF89a garbage",
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        ],
    )
    def test_not_an_image(self, data):
        with pytest.raises(InvalidRequestError) as e:
            decode_image(data, param="p")
        assert e.value.param == "p"

    def test_truncated_image(self):
        data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
        with pytest.raises(InvalidRequestError):
            decode_image(data[: len(data) // 2])

    def test_unsupported_format(self):
        with pytest.raises(InvalidRequestError) as e:
            decode_image(encode(Image.new("RGB", (4, 4)), "TIFF"))
        assert "TIFF" in e.value.message

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
    def test_allowed_formats(self, fmt):
        d = decode_image(encode(Image.new("RGB", (7, 5), (200, 100, 50)), fmt))
        assert (d.width, d.height) == (7, 5)
        assert d.image.mode == "RGB"

    def test_exif_orientation_6_transposed(self):
        # stored 64 wide x 32 high: left half red, right half blue; orientation 6 = rotate 90 CW to display
        img = Image.new("RGB", (64, 32), (0, 0, 255))
        img.paste((255, 0, 0), (0, 0, 32, 32))
        exif = img.getexif()
        exif[0x0112] = 6
        data = encode(img, "JPEG", exif=exif, quality=95)
        d = decode_image(data)
        assert (d.width, d.height) == (32, 64)
        assert d.image.size == (32, 64)
        top, bottom = d.image.getpixel((16, 8)), d.image.getpixel((16, 56))
        assert top[0] > 200 and top[2] < 60, top  # the stored left (red) column is now the top row
        assert bottom[2] > 200 and bottom[0] < 60, bottom

    def test_gif_first_frame(self):
        frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
        d = decode_image(buf.getvalue())
        assert (d.width, d.height) == (8, 8)
        r, g, b = d.image.getpixel((4, 4))
        assert r > 200 and g < 50 and b < 50

    def test_multi_picture_jpeg_first_picture(self):
        """JPEGs with an MPF extension (as many phone cameras write them) open in Pillow as format "MPO";
        they are JPEG files and must decode (first picture), not be refused as an unknown format."""
        a, b = Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 255))
        data = encode(a, "MPO", save_all=True, append_images=[b])
        assert data[:3] == b"\xff\xd8\xff"  # a JPEG file
        d = decode_image(data)
        assert (d.width, d.height) == (16, 8)
        r, g, bl = d.image.getpixel((8, 4))
        assert r > 200 and bl < 50

    def test_policy_pixel_limit(self):
        data = png_bytes(Image.new("RGB", (20, 20)))
        with pytest.raises(PayloadTooLargeError):
            decode_image(data, MediaPolicy(max_pixels=399))
        assert decode_image(data, MediaPolicy(max_pixels=400)).width == 20

    @pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
    @pytest.mark.parametrize("w,h", [(10_000, 10_000), (40_000, 40_000)])
    def test_decompression_bomb_header(self, w, h):
        """A tiny PNG whose header claims a huge canvas is refused from its header, before decoding."""
        data = bytearray(png_bytes(Image.new("L", (1, 1))))
        ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
        data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
        data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
        t0 = time.monotonic()
        with pytest.raises(PayloadTooLargeError):
            decode_image(bytes(data))
        assert time.monotonic() - t0 < 2


@pytest.fixture(scope="module")
def pixels():
    return Image.effect_noise((33, 17), 80).convert("RGB")


class TestContentKey:
    def test_equal_bytes_equal_keys(self, pixels):
        assert content_key(png_bytes(pixels), "s") == content_key(png_bytes(pixels), "s")

    def test_same_pixels_in_another_encoding_is_another_key(self, pixels):
        """Keys are of the bytes (the gateway never decodes): a re-encoded picture is encoded again, never mixed
        up with another."""
        a, b = encode(pixels, "PNG"), encode(pixels, "BMP")
        assert decode_image(a).image.tobytes() == decode_image(b).image.tobytes()
        assert content_key(a, "s") != content_key(b, "s")

    def test_one_changed_pixel(self, pixels):
        other = pixels.copy()
        r, g, b = other.getpixel((5, 5))
        other.putpixel((5, 5), (r ^ 1, g, b))
        assert content_key(png_bytes(pixels), "s") != content_key(png_bytes(other), "s")

    def test_settings_matter(self, pixels):
        data = png_bytes(pixels)
        assert content_key(data, "a") != content_key(data, "b")
        assert content_key(data, "a") == content_key(data, "a")


class TestImageSize:
    """The gateway reads sizes from headers; they must be what decoding gives."""

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
    def test_equals_the_decoded_size(self, fmt):
        data = encode(Image.new("RGB", (7, 5), (200, 100, 50)), fmt)
        d = decode_image(data)
        assert image_size(data) == (d.width, d.height) == (7, 5)

    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_exif_orientation(self, orientation):
        img = Image.new("RGB", (64, 32), (0, 0, 255))
        exif = img.getexif()
        exif[0x0112] = orientation
        data = encode(img, "JPEG", exif=exif)
        d = decode_image(data)
        assert image_size(data) == (d.width, d.height)

    def test_truncated_body_passes_the_header_check_and_fails_to_decode(self):
        data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
        assert image_size(data[: len(data) // 2]) == (64, 64)
        with pytest.raises(InvalidRequestError):
            decode_image(data[: len(data) // 2])

    @pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
    def test_not_an_image(self, data):
        with pytest.raises(InvalidRequestError) as e:
            image_size(data, param="p")
        assert e.value.param == "p"

    def test_unsupported_format_and_pixel_limit(self):
        with pytest.raises(InvalidRequestError):
            image_size(encode(Image.new("RGB", (4, 4)), "TIFF"))
        with pytest.raises(PayloadTooLargeError):
            image_size(png_bytes(Image.new("RGB", (20, 20))), MediaPolicy(max_pixels=399))
