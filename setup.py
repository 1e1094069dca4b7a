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
        "salesforce-lavis==1.0.2",
        "torch>=2.0",
        "torchvision",
        "transformers>=4.25,<4.27",
        "tokenizers",
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
