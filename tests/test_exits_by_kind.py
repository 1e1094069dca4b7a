"""Exit histogram by token kind (lavis_free.evaluation.exits_by_kind)."""
import torch

import lavis_free
from lavis_free.evaluation.exits_by_kind import histogram, token_kinds
from lavis_free.hosts import exits_of
from lavis_free.models import tiny


def test_token_kinds_follow_the_shapes_vocabulary():
    tokenizer = tiny.load_opt_tokenizer()
    kinds = token_kinds(tokenizer, "a small red circle in the top left and two other shapes")
    words = [tokenizer.decode([i]).strip() for i in tokenizer("a small red circle in the top left and two other shapes", add_special_tokens=False).input_ids]
    assert len(kinds) == len(words) + 1 and kinds[-1] == "end"
    by_word = dict(zip(words, kinds))
    assert by_word == {"a": "function", "small": "size", "red": "colour", "circle": "shape", "in": "function", "the": "function",
                       "top": "position", "left": "position", "and": "function", "two": "count", "other": "function", "shapes": "function"}


def test_every_generated_token_after_the_first_is_counted_at_the_layers_it_ran():
    torch.manual_seed(0)
    model = lavis_free.load_model("blip2_opt_free", "shapes_tiny")
    dataset = [{"image": torch.rand(3, 64, 64)} for _ in range(5)]
    report = histogram(model, dataset, threshold=0.5, batch_size=2, max_length=6)  # most captions cut before EOS
    _, stats = model.generate({"image": torch.stack([d["image"] for d in dataset])}, num_beams=1, max_length=6,
                              return_exit_stats=True, exit_threshold=0.5)
    counted = sum(n for c in report["counts"].values() for n in c.values())
    assert counted == sum(len(row) - 1 for row in stats["exit_layers"])
    assert report["skipped_captions"] == 0 and report["threshold"] == 0.5
    depths = {int(l) for c in report["counts"].values() for l in c}
    assert depths <= {3, 6, 9, 12} and len(depths) > 1
    assert report["exits_layers_run"] == [l + 1 for l in exits_of(model).config.layers]
