"""Stage 0 of the frozen-LM recipe (`shapes_frozen_lm`): the components BLIP-2 takes pretrained.

BLIP-2 freezes an image encoder and an LM that were each pretrained on their own and trains only
the Q-Former and projection between them. In miniature: `text_lm` pretrains the OPT LM on shapes
text, `vision` pretrains the ViT to recognise scenes, and `components` merges both into the
`model.pretrained` file of the stage-1 YAML (projects/free/shapes_stage1_frozen_lm.yaml).
"""
