"""A search service that takes seconds to warm up: before it listens, it generates a corpus and
builds an in-memory inverted index of it (a few hundred MB at full size).

    python warm_service.py PORT DOCUMENTS

GET /doc/N answers document N's text (the bench regenerates it with `document` to check the
answer); GET /search/WORD answers how many documents contain WORD. SIGTERM ends it.
"""

from __future__ import annotations

import http.server
import random
import signal
import sys
from collections import defaultdict
from typing import NoReturn

VOCABULARY_SIZE = 40_000
WORDS_PER_DOCUMENT = 48
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "du", "fa", "go", "hu", "ji")


def vocabulary() -> list[str]:
    words = []
    base = len(SYLLABLES)
    for number in range(VOCABULARY_SIZE):
        parts = []
        rest = number
        while True:
            rest, digit = divmod(rest, base)
            parts.append(SYLLABLES[digit])
            if rest == 0:
                break
        words.append("".join(parts))
    return words


VOCABULARY = vocabulary()


def document(number: int) -> str:
    """The text of document `number`: the same in the service and in the bench."""
    rng = random.Random(number)
    return " ".join(rng.choices(VOCABULARY, k=WORDS_PER_DOCUMENT))


class SearchIndex:
    def __init__(self, documents: int) -> None:
        self.texts: list[str] = []
        self.postings: defaultdict[str, list[int]] = defaultdict(list)
        for number in range(documents):
            text = document(number)
            self.texts.append(text)
            for word in set(text.split()):
                self.postings[word].append(number)

    def answer(self, path: str) -> bytes | None:
        kind, _, key = path.strip("/").partition("/")
        if kind == "doc" and key.isdigit() and int(key) < len(self.texts):
            return self.texts[int(key)].encode()
        if kind == "search":
            return str(len(self.postings.get(key, ()))).encode()
        return None


def serve(port: int, index: SearchIndex) -> NoReturn:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = index.answer(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()
    raise SystemExit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port, documents = int(sys.argv[1]), int(sys.argv[2])
    index = SearchIndex(documents)
    print(f"warm: {documents} documents, {len(index.postings)} words", flush=True)
    serve(port, index)


if __name__ == "__main__":
    main()
