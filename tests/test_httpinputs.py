"""Request bodies to images: a multipart form split into its parts, and every malformed
one refused with its status and a line saying why."""

from __future__ import annotations

import pytest

from convnet.use.loadtest import multipart_body


def test_multipart_parser() -> None:
    from convnet.use.httpinputs import RequestError, parse_multipart

    body, ctype = multipart_body([b"\x89PNG one", b"two\r\n--not-the-boundary\r\n"], ["a b.png", "\u00e9.png"])
    parts = parse_multipart(b"preamble\r\n" + body + b"epilogue", ctype, 5)
    assert parts == [("file", "a b.png", b"\x89PNG one"), ("file", "\u00e9.png", b"two\r\n--not-the-boundary\r\n")]
    for broken, message in ((body[: len(body) // 2], "not closed"), (b"no boundary here", "no boundary line"),
                            (body.replace(b'name="file"', b'name="photo"'), "unexpected form field 'photo'"),
                            (body.replace(b"Content-Disposition", b"X-Other"), "without a Content-Disposition")):
        with pytest.raises(RequestError, match=message):
            parse_multipart(broken, ctype, 5)
    with pytest.raises(RequestError, match="at most 1") as e:
        parse_multipart(body, ctype, 1)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="no boundary"):
        parse_multipart(body, "multipart/form-data", 5)
