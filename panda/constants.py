"""Values several layers share (data, models, evaluation). Imports nothing, so any module may use it."""

IGNORE_INDEX = -100  # label of a position the LM loss skips (system text, user turns, visual tokens, padding)
IMAGE_TOKEN = "<image>"  # one placeholder per frame in the rendered text (docs/recipe-reference.md, "Token ids")
IMAGE_PLACEHOLDER_ID = -200  # its id in ``input_ids``; the model splices that frame's visual tokens there

# CLIP normalisation statistics (docs/model-reference.md, "Normalisation"): STAB's frames and the teachers' use them
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RELEASE_FRAMES = 8  # frames per video of the Video-Panda-7B release
RELEASE_EVAL_TEMPLATE = "vicuna_v1_eval"  # the release's evaluation template ("curious human")
