"""MS-COCO captions as a prompt source (tfmq.diffusion.text.read_coco_captions / read_prompts on a .json)."""
import json
import random

import pytest

from tfmq.diffusion.text import read_coco_captions, read_prompts

# image_id -> its annotations as (annotation id, caption); the lowest id is the one kept
ANNOTATIONS = {
    42: [(905, "A dog on a  sofa."), (901, "  A brown dog\nsleeping on a couch. "), (990, "Dog.")],
    7: [(310, "Two people riding bikes.")],
    391: [(77, "A plate of food\twith broccoli."), (78, "Food on a plate.")],
    13: [(500, "A red bus on a street."), (499, "   ")],  # a blank caption never wins
    250: [(12, "A kitchen with a window."), (13, "An empty kitchen.")],
    8: [(640, "A cat looking out of a window.")],
}
KEPT = {42: "A brown dog sleeping on a couch.", 7: "Two people riding bikes.", 391: "A plate of food with broccoli.",
        13: "A red bus on a street.", 250: "A kitchen with a window.", 8: "A cat looking out of a window."}


def write_captions(path, annotations=ANNOTATIONS):
    anns = [{"image_id": i, "id": a, "caption": c} for i, pairs in annotations.items() for a, c in pairs]
    random.Random(1).shuffle(anns)  # file order must not matter
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in annotations] + [{"id": 999, "file_name": "x.jpg"}]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def expected_order(seed):
    ids = sorted(KEPT)
    random.Random(seed).shuffle(ids)
    return [KEPT[i] for i in ids]


def test_one_caption_per_image_lowest_id_whitespace_collapsed_seeded_order(tmp_path):
    path = write_captions(tmp_path / "captions_val2014.json")
    caps = read_coco_captions(path)
    assert len(caps) == 6 and set(caps) == set(KEPT.values())
    assert caps == expected_order(0)
    # the seed-0 rule written out: sorted ids [7, 8, 13, 42, 250, 391] shuffled by random.Random(0)
    ids = [7, 8, 13, 42, 250, 391]
    random.Random(0).shuffle(ids)
    assert caps == [KEPT[i] for i in ids]
    assert ids == [250, 13, 8, 7, 391, 42]  # the literal order, so a change of rule (or of random) shows here
    assert read_prompts(path) == caps  # a .json prompt file is read as COCO captions, seed 0
    assert read_coco_captions(path, seed=0) == caps


def test_different_seeds_reorder_the_same_set(tmp_path):
    path = write_captions(tmp_path / "caps.JSON")
    orders = {tuple(read_coco_captions(path, seed=s)) for s in range(5)}
    assert len(orders) > 1
    assert all(sorted(o) == sorted(KEPT.values()) for o in orders)
    assert list(read_coco_captions(path, seed=3)) == expected_order(3)


def test_text_prompt_files_unchanged(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a photo of a cat \n\n a dog\n")
    assert read_prompts(path) == ["a photo of a cat", "a dog"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "cannot read it as JSON"),
    (json.dumps({"images": []}), 'no "annotations" list at the top level'),
    (json.dumps([1, 2]), 'no "annotations" list at the top level'),
    (json.dumps({"annotations": [{"image_id": 1, "caption": "a"}]}), "annotation 0 is .*, not"),
    (json.dumps({"annotations": [{"image_id": 1, "id": 2, "caption": " \n "}]}), "no annotation holds a caption"),
    (json.dumps({"annotations": []}), "no annotation holds a caption"),
])
def test_refusals(tmp_path, text, match):
    path = tmp_path / "captions.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        read_prompts(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert msg.endswith("expected an MS-COCO captions JSON (annotations/captions_val2014.json layout) "
                        "or a text file with one prompt per line")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        read_coco_captions(tmp_path / "missing.json")
