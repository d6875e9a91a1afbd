"""Makes the torch references importable beside the CPU torch (imported for its effect).

The registry's torchvision wheels are CUDA builds: beside the CPU torch their compiled ops do
not load, and the fake-kernel registrations of those ops then raise at `import torchvision`,
breaking transformers' CLIP, diffusers' models (through transformers) and pytorch-fid's
Inception (the references). All use only its pure-Python model code, so the registrations are
skipped. The tests' conftest and the benchmarks import this before anything imports torch.
"""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations",
                       types.ModuleType("torchvision._meta_registrations"))
