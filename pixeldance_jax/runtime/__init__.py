"""What every layer may use and that is no model, data or training code: `errors`
(`ConfigError`), `quiet` (library prints), `programs` (one compiled program per config),
`host_memory` and `threefry_cpu` (CPU settings the commands apply)."""
