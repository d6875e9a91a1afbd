"""What a command prints: a calm console, and one-line errors for bad command lines.

Every entry point (train.py, sample.py, `python -m pixeldance_jax.convert`, the benchmarks)
defines its flags, then hands its `main` to `console.run`:

  from pixeldance_jax.cli import console
  ...
  if __name__ == "__main__":
    console.run(main)

`run` is `absl.app.run` plus five things:
- On the CPU, JAX's random-bit hash is lowered as straight-line code (`threefry_cpu`: same
  bits, faster compiles). Importing the package changes nothing in JAX; the commands do this.
- For training commands (`run(main, reuse_freed_memory=True)`), on a CPU-only install,
  glibc's malloc keeps the memory XLA frees for the next step (`host_memory`: the tiny train
  step 15% faster).
- `--log_level` (defined here): "progress" (default) shows this project's INFO lines (data
  generation, compiles, a progress line every `log_every_steps`, checkpoints, where outputs
  went) and only the warnings and errors of libraries (Orbax, TFDS, grain, absl, JAX), whose INFO
  lines narrate their internals (about 50 lines per Orbax save). "info" and "debug" bring every
  library's lines back, in absl's full format (file:line). "warning" shows warnings and errors
  only.
- Config overrides are checked before absl parses them: `--config.unet.block_out_chanels=3`
  is one line naming the key and the closest valid one (`config_override_errors`), exit
  code 2, no traceback. So is a value ml_collections cannot parse as the field's type.
- `ConfigError` (e.g. from `train.config_checks`) or `app.UsageError` raised by `main` is
  printed as one line per problem, exit code 2.

Why a filter on the handler rather than a logger of our own: this project logs through
`absl.logging`, and so do Orbax, TFDS and grain, so every record arrives on the one "absl"
logger and a logger level cannot tell them apart. The record's source file can: a filter on the
root handler passes this package's (and the running script's) records from `progress` level
and everyone else's from WARNING. Nothing in the rest of the code needs to change how it logs.
"""

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
import tensorflow_datasets as tfds
from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from pixeldance_jax.runtime import host_memory, quiet, threefry_cpu
from pixeldance_jax.runtime.errors import ConfigError, closest

LEVELS = ("warning", "progress", "info", "debug")
LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "progress", LEVELS, "Console detail: 'progress' (default) shows this "
    "project's progress and the libraries' warnings; 'info' or 'debug' also every library's "
    "own lines (Orbax, TFDS, grain, absl, JAX); 'warning' only warnings and errors.")

# The first level each source shows, by --log_level: (this project, libraries).
_THRESHOLDS = {
    "warning": (logging.WARNING, logging.WARNING),
    "progress": (logging.INFO, logging.WARNING),
    "info": (logging.INFO, logging.INFO),
    "debug": (logging.DEBUG, logging.DEBUG),
}
# Library warnings that are expected on every run of this project and say nothing to act on.
_EXPECTED_WARNINGS = (
    # TFDS, for every builder made with a config object; all of ours are.
    "Using custom data configuration",
    # Orbax, for every read-only CheckpointManager (sampling, evaluation).
    "CheckpointManagerOptions.read_only=True",
    "Given directory is read only",
    # Orbax, reading one item of a composite checkpoint (the weights for sampling): the
    # per-item metadata file it looks for first is not written for composite items.
    "Metadata file does not exist",
)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _is_ours(record: logging.LogRecord) -> bool:
  """Logged from this package or from the script being run (train.py, a benchmark)."""
  path = os.path.abspath(record.pathname)
  return path.startswith(_PACKAGE_DIR) or path == os.path.abspath(sys.argv[0] or "-")


class _SourceFilter(logging.Filter):
  """Passes a record from its source's threshold: ours or a library's."""

  def __init__(self, ours: int, libraries: int):
    super().__init__()
    self.ours, self.libraries = ours, libraries

  def filter(self, record: logging.LogRecord) -> bool:
    if _is_ours(record):
      return record.levelno >= self.ours
    if record.levelno < self.libraries:
      return False
    return not record.getMessage().startswith(_EXPECTED_WARNINGS)


class _ShortFormatter(logging.Formatter):
  """`12:03:04 message`; warnings and errors say so (`12:03:04 WARNING: message`)."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def setup(level_name: str = "progress") -> None:
  """Routes logging to stderr through absl's handler, filtered as `level_name` (`LEVELS`).

  Idempotent; call it at the start of `main` (after absl parsed the flags), or use `run`.
  """
  if level_name not in _THRESHOLDS:
    raise ValueError(f"log level {level_name!r} is not one of {LEVELS}")
  ours, libraries = _THRESHOLDS[level_name]
  absl_logging.use_absl_handler()
  handler = absl_logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _SourceFilter)]:
    handler.removeFilter(old)
  handler.addFilter(_SourceFilter(ours, libraries))
  verbose = level_name in ("info", "debug")
  handler.setFormatter(absl_logging.PythonFormatter() if verbose else _ShortFormatter())
  # The root level lets the records through to the filter, which decides.
  absl_logging.set_verbosity(min(ours, libraries))
  quiet.set_quiet(not verbose)
  tfds.display_progress_bar(verbose)  # tqdm bars while a dataset is generated.
  # JAX warns at every fork; subprocess forks only to exec at once (ffmpeg), which is safe.
  warnings.filterwarnings("ignore" if not verbose else "default", message=r"os\.fork\(\)",
                          category=RuntimeWarning, module="subprocess")


def fail(message: str, exit_code: int = 2) -> NoReturn:
  """Prints `error: <line>` per line of `message` to stderr and exits: no traceback."""
  for line in str(message).strip().splitlines() or ["(no message)"]:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(exit_code)


# --- Config overrides ---------------------------------------------------------------------


def _keys(node: Any) -> list[str] | None:
  if isinstance(node, (ml_collections.ConfigDict, Mapping)):
    return list(node.keys())
  return None


def _key_error(config: Any, path: str, name: str) -> str | None:
  """Why `name.path` names no field of `config` (with the closest key), or None if it does."""
  node, parts = config, path.split(".")
  for depth, part in enumerate(parts):
    keys, where = _keys(node), ".".join([name, *parts[:depth]])
    if keys is None:
      return f"{where} is a {type(node).__name__}, not a section with keys"
    if part not in keys:
      close = closest(part, keys)
      if close:
        suggestion = ".".join([where, close[0], *parts[depth + 1:]])
        return f"{where} has no key {part!r}; did you mean --{suggestion}?"
      return f"{where} has no key {part!r}; its keys: {', '.join(sorted(keys))}"
    node = node[part]
  return None


def _value_at(config: Any, path: str) -> Any:
  for part in path.split("."):
    config = config[part]
  return config


def config_override_errors(config: Any, argv: Sequence[str], name: str = "config"
                           ) -> list[str]:
  """One line per `--<name>.a.b[=value]` in `argv` whose key path is not in `config`."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
  errors = []
  for arg in argv:
    match = pattern.match(arg)
    if match and (error := _key_error(config, match.group(1), name)):
      errors.append(f"--{arg.lstrip('-').split('=', 1)[0]}: {error}")
  return errors


def _config_argument(argv: Sequence[str], name: str) -> str | None:
  """The value of `--<name>=path` (or `--<name> path`) in argv."""
  for index, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if match:
      return match.group(2) if match.group(1) else (argv[index + 1] if index + 1 < len(argv)
                                                     else None)
  return None


def _config_file_flags(flag_values: flags.FlagValues) -> dict[str, flags.Flag]:
  """{name: flag} of the config-file flags (`config_flags.DEFINE_config_file`)."""
  return {name: flag_values[name] for name in list(flag_values)
          if isinstance(flag_values[name].parser, ConfigFileFlagParser)}


def _type_hint(configs: Mapping[str, Any], error: Exception) -> str:
  """` (config.x is an int, now 4)` for the override a parse error names, else ''."""
  match = re.search(r"--(\w+)\.([\w.]+)=", str(error))
  if not match or match.group(1) not in configs:
    return ""
  try:
    value = _value_at(configs[match.group(1)], match.group(2))
  except (KeyError, AttributeError, TypeError):
    return ""
  kind = type(value).__name__
  article = "an" if kind[0] in "aeiou" else "a"
  return f" ({match.group(1)}.{match.group(2)} is {article} {kind}, now {value!r})"


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
                ) -> list[str]:
  """absl's flags parser (`app.run(main, flags_parser=...)`) that refuses, one line each and
  before ml_collections sees them, config overrides naming no key; any other parse error is
  one line too. Exits with code 2 on an error; returns the remaining arguments."""
  configs = {}
  for name, flag in _config_file_flags(flag_values).items():
    path = _config_argument(argv, name)
    # A first, cheap load of the config file (plain Python); one that cannot be read is
    # reported by the real parse below. Without the flag on the command line, its default,
    # which absl already parsed when the flag was defined (None without one).
    config = flag.parser.parse(path) if path else flag.default
    if config is None or _keys(config) is None:
      continue
    configs[name] = config
    errors = config_override_errors(config, argv, name)
    if errors:
      fail("\n".join(errors))
  try:
    return flag_values(list(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).split())  # ml_collections' messages span lines.
    fail(f"{message}{_type_hint(configs, error)}. See --helpshort.")


def flag_values(argv: Sequence[str], holders: Mapping[str, Any],
                required: Sequence[str] = ()) -> dict[str, Any]:
  """`{name: value}` of a command's flag holders; a usage error for positional arguments or a
  required flag left empty."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  values = {name: holder.value for name, holder in holders.items()}
  missing = [f"--{holders[name].name}" for name in required if values[name] in (None, "")]
  if missing:
    raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         "required")
  return values


def run(main: Callable[[list[str]], Any], reuse_freed_memory: bool = False) -> None:
  """`absl.app.run(main)` with the checked flags, the console set up from --log_level, and
  `ConfigError` or `app.UsageError` printed as one line per problem (exit code 2).

  `reuse_freed_memory`: for commands that run a compiled step many times (training), keep
  freed host memory for reuse on a CPU-only install (`host_memory`)."""

  def main_on_console(argv: list[str]) -> Any:
    host_memory.quiet_libtpu()  # Before JAX starts its backend, as is the next.
    if reuse_freed_memory:
      host_memory.reuse_freed_memory()
    threefry_cpu.register()
    setup(LOG_LEVEL.value)
    try:
      return main(argv)
    except (ConfigError, app.UsageError) as error:
      fail(str(error))

  app.run(main_on_console, flags_parser=parse_flags)
