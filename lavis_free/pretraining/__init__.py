"""Stage 0 of the frozen-LM recipe (`shapes_frozen_lm`): the components BLIP-2 takes pretrained.

BLIP-2 freezes an image encoder and an LM that were each pretrained on their own and trains only
the Q-Former and projection between them (after a representation stage). In miniature: `text_lm`
pretrains the OPT LM on shapes text read after a scene prefix, `vision` pretrains the ViT to
recognise scenes, `qformer` teaches the Q-Former to write the scene prefix from the image, and
`components` merges them into the `model.pretrained` file of the stage-1 YAML
(projects/free/shapes_stage1_frozen_lm.yaml).
"""
