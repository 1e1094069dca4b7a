"""The synthetic shapes data (``python -m lavis_free.datasets.shapes``), LAVIS-format datasets
and the builders ``shapes_caption``, ``shapes_vqa``, ``shapes_dialogue`` (registered by
``import lavis_free``, which imports :mod:`lavis_free.datasets.builders`)."""
