"""LAVIS tasks of the plugin: ``free_captioning``, ``free_vqa``, ``free_dialogue``, ``free_visdial``, ``free_instruct``.

The metric functions (``caption_metrics``, ``vqa_metrics``, ``dialogue_metrics``) work on plain
prediction lists, without a runner.
"""
from lavis_free.tasks.answer_metrics import dialogue_metrics, vqa_accuracy, vqa_metrics  # noqa: F401
from lavis_free.tasks.caption_metrics import caption_metrics  # noqa: F401
from lavis_free.tasks.captioning import FreeCaptionTask  # noqa: F401
from lavis_free.tasks.vqa import FreeDialogueTask, FreeVQATask  # noqa: F401
from lavis_free.tasks.instruct import FreeInstructTask  # noqa: F401
from lavis_free.tasks.visdial import FreeVisDialTask, visdial_metrics  # noqa: F401
