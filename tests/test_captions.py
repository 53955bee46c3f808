"""Reading a caption back: every caption the world writes is judged exact; wrong, missing and
invented objects are counted as worked out by hand."""

from __future__ import annotations

import random

from minimind_v.captions import held_out_pictures, judge_caption, said_objects
from minimind_v.data.shapes import ShapesWorldConfig, caption, generate_world, random_scene


def obj(size, colour, shape, position):
    return {"size": size, "colour": colour, "shape": shape, "position": position}


def test_every_caption_the_world_writes_is_read_back_exactly():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        for order in ("random", "reading"):
            text = caption(scene, rng, order)
            assert judge_caption(text, scene) == {"exact": True, "right": len(scene), "said": len(scene),
                                                  "there": len(scene)}, text


def test_wrong_missing_and_invented_objects_are_counted():
    scene = [obj("small", "red", "circle", "top left"), obj("large", "blue", "cross", "bottom left")]
    # Right but for one position word: "bottom" is not "bottom left".
    one_wrong = "There is a small red circle in the top left and a large blue cross at the bottom."
    assert said_objects(one_wrong)[1] == ("large", "blue", "cross", "bottom")
    assert judge_caption(one_wrong, scene) == {"exact": False, "right": 1, "said": 2, "there": 2}
    missing = "A small red circle in the top left."
    assert judge_caption(missing, scene) == {"exact": False, "right": 1, "said": 1, "there": 2}
    invented = ("Three objects: a large blue cross in the bottom left, a small red circle in the top left "
                "and a small green square in the center.")
    assert judge_caption(invented, scene) == {"exact": False, "right": 2, "said": 3, "there": 2}
    assert judge_caption("one", scene) == {"exact": False, "right": 0, "said": 0, "there": 2}


def test_held_out_pictures_are_the_distinct_one_picture_records(tmp_path):
    config = ShapesWorldConfig(n_pretrain=4, n_sft=4, n_eval=40, n_eval_images=1, workers=1,
                               question_types=("colour", "count", "two_pictures"))
    generate_world(tmp_path, config)
    pictures = held_out_pictures(tmp_path)
    names = [p.name for p, _ in pictures]
    assert len(names) == len(set(names)) > 0 and all(p.is_file() for p, _ in pictures)
    assert len(held_out_pictures(tmp_path, limit=2)) == 2
