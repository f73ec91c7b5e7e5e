"""The files of a ``multipart/form-data`` body that is already in memory, read without blocking anything else.

Why not Starlette's ``Request.form()``: it is a coroutine (it must run on the event loop), it
spools every file part into a ``SpooledTemporaryFile`` and hands back ``UploadFile`` objects,
and it cost the event loop about 2.5 ms of CPU for a 700 KB body of 32 PNGs. A flood of such
uploads then took the CPU that ordinary ``/predict`` traffic needed, even though every one of
them was refused once parsed (serving/README.md, "Bounded image work"). The body is already
read against ``FLUXO_MAX_BODY_BYTES`` here, so this plain function over python-multipart's
parser can run wherever the caller likes: on the image pool, at a lower priority, for large
uploads (serving/image_work.py).
"""

from __future__ import annotations

from serving.http import ApiError


def uploaded_files(content_type: str, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(name for messages, bytes) of every file part, in order; 400 when malformed, 413 beyond ``limit`` parts."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed multipart upload: the Content-Type has no boundary")
    files: list[tuple[str, bytes]] = []
    state = _Part()
    counts = {"files": 0, "fields": 0}

    def on_part_begin() -> None:
        nonlocal state
        state = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        if state.header_name.lower() == b"content-disposition":
            state.disposition = state.header_value
        state.header_name, state.header_value = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state.disposition)
        if b"name" not in options:
            raise ApiError(400, 'malformed multipart upload: a part\'s Content-Disposition has no "name"')
        state.field = options[b"name"].decode("utf-8", "replace")
        state.filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        kind = "files" if state.filename is not None else "fields"
        counts[kind] += 1
        if counts[kind] > limit:
            raise ApiError(413, f"more than {limit} {kind} in the upload, the limit per request (FLUXO_MAX_INSTANCES)")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.filename is not None:  # other fields are not used: not kept
            state.chunks.append(data[start:end])

    def on_part_end() -> None:
        if state.filename is not None:
            files.append((f"file {state.filename or state.field!r}", b"".join(state.chunks)))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart's errors for hostile bodies vary
        raise ApiError(400, f"malformed multipart upload: {error}") from None
    return files


class _Part:
    """What is known of the part being read."""

    def __init__(self) -> None:
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.field = ""
        self.filename: str | None = None
        self.chunks: list[bytes] = []
