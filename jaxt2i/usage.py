"""The argument parser of every ``jaxt2i`` command: a usage error is one line on stderr, exit status 2."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``PROG: error: MESSAGE (see PROG --help)``) with
    exit status 2, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
