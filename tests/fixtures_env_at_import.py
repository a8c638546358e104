import os

CHUNK = int(os.environ.get("X", 1))  # read at import: found


class Settings:
    ISA = os.getenv("Y")  # a class body runs at import: found

    def read(self):
        return os.environ.get("Z")  # inside a function: not an import-time read
