"""lavis-free: FREE early exits for LAVIS vision-language models."""
from setuptools import find_packages, setup

setup(
    name="lavis-free",
    version="0.1.0",
    description="Fast and robust early exits (FREE) for LAVIS vision-language models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lavis_free", "lavis_free.*"]),
    include_package_data=True,
    package_data={
        "lavis_free": [
            "models/configs/*.yaml",
            "models/assets/**/*",
            "datasets/configs/*.yaml",
        ]
    },
    python_requires=">=3.9",
    install_requires=[
        # Both supported stacks (README "Install"): salesforce-lavis 1.0.2 with transformers 4.26
        # (the default, pinned by constraints.txt) and with transformers 4.33.2, what LAVIS's GitHub
        # main pins (constraints-lavis-main.txt); main's own package metadata says 1.0.1, so a LAVIS
        # installed from source is kept as it is.
        "salesforce-lavis>=1.0.1,<1.1",
        "torch>=2.0",
        "torchvision",
        "transformers>=4.25,<4.34",
        "tokenizers",
        "packaging",
        "omegaconf",
        "timm==0.4.12",
        "pycocoevalcap",
        "pycocotools",
        "webdataset",
        "numpy<2",
        "Pillow",
        "matplotlib",
        "tqdm",
        "psutil",
        "PyYAML",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
