"""Whether the console is quiet, and hiding what libraries print while it is."""

import contextlib
import io
from collections.abc import Iterator

_quiet = False  # Set by the commands' console setup (`cli.console.setup`).


def set_quiet(quiet: bool) -> None:
  global _quiet
  _quiet = quiet


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
  """Hides what libraries `print` to stdout inside the block (TFDS's "Downloading and
  preparing dataset..." banners) unless the console is verbose; our lines go to stderr."""
  if not _quiet:
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()):
    yield
