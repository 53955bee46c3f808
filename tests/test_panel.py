"""The Q&A panel of chapter 7, driven from code as a reader would click it: every callback, and
every bad input ending in a message in the panel rather than an exception.

Two tiny random VLMs (conftest's world tokenizer and tiny CLIP) stand for the models after
pretraining and after SFT; the references are ``inference.answer``, transformers' ``generate``
and the shapes world's own renderer.
"""

import datetime
import html
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minimind_v.data.shapes import render_scene  # noqa: E402
from minimind_v.inference import LoadedVLM, answer, suppressed_ids  # noqa: E402
from minimind_v.viz import image_share, qa_widget  # noqa: E402
from minimind_v.tokenizer import encode_chat  # noqa: E402
from minimind_v.viz.panel_layout import DEFAULT_OBJECTS  # noqa: E402
from minimind_v.viz.tokens import token_text  # noqa: E402
from minimind_v.viz import widget as widget_module  # noqa: E402

QUESTION = "What colour is the circle?"
TWO_RED_ONE_BLUE = [
    dict(shape="circle", colour="red", size="small", position="top left"),
    dict(shape="circle", colour="red", size="large", position="center"),
    dict(shape="circle", colour="blue", size="small", position="bottom right"),
]


@pytest.fixture(scope="module")
def models(make_tiny_vlm, world_tokenizer, tiny_encoder):
    def vlm(seed):
        model = make_tiny_vlm(seed).eval()
        # A larger init than training's, so the random models give varied, different answers.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
        return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)

    return {"after pretraining": vlm(1), "after SFT": vlm(2)}


@pytest.fixture
def demo_images(tmp_path):
    paths = []
    for i, scene in enumerate([TWO_RED_ONE_BLUE[:1], TWO_RED_ONE_BLUE[1:]]):
        path = tmp_path / f"demo_{i}.png"
        render_scene(scene).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def ask(panel, question=QUESTION):
    panel.question.value = question
    panel.ask_button.click()


def upload_item(name, data):
    return {"name": name, "type": "", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.datetime.now()}


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_steps(vlm, image, question, max_new_tokens):
    """Each step's distribution as transformers' generate scores it (suppressed tokens at -inf)."""
    tok, model = vlm.processor.tokenizer, vlm.model
    # The prompt built without the processor: encode_chat on one human turn, the tag in front.
    ids = torch.tensor([encode_chat(tok, [{"from": "human", "value": "<image>\n" + question}],
                                    model.config.num_image_tokens, add_generation_prompt=True)[0]])
    tokens = None if image is None else vlm.encoder(vlm.encoder.preprocess([image]))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), image_tokens=tokens,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id or 0, suppress_tokens=suppressed_ids(tok),
                         output_scores=True, return_dict_in_generate=True)
    return [torch.softmax(s[0].float(), -1) for s in out.scores]


# ----------------------------------------------------------------------------- the models


def test_models_on_offer(models):
    panel = qa_widget(models)
    assert list(panel.model_select.options) == [
        "after pretraining", "after SFT", "after SFT, without the picture (text only)"]
    assert panel.model_select.value == "after pretraining"
    assert list(qa_widget(models, text_only=None).model_select.options) == ["after pretraining", "after SFT"]
    assert qa_widget(models, text_only="after pretraining").models[
        "after pretraining, without the picture (text only)"] == (models["after pretraining"], False)
    single = qa_widget(models["after SFT"])  # one model, as before
    assert list(single.model_select.options) == ["model", "model, without the picture (text only)"]
    with pytest.raises(ValueError, match="text_only"):
        qa_widget(models, text_only="after nothing")


def test_each_model_answers_as_inference_does(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=6)
    image = Image.open(demo_images[0]).convert("RGB")
    answers = {}
    for label, vlm in models.items():
        panel.model_select.value = label
        ask(panel)
        assert panel.messages == [] and panel.last_trace.with_image
        assert panel.last_answer == answer(vlm, [image], [QUESTION], max_new_tokens=6)[0]
        answers[label] = panel.last_answer
    assert answers["after pretraining"] != answers["after SFT"]  # the choice reached the model

    panel.model_select.value = "after SFT, without the picture (text only)"
    assert "question alone" in panel.messages[-1]
    ask(panel)
    assert panel.last_answer == answer(models["after SFT"], None, [QUESTION], max_new_tokens=6)[0]
    assert not panel.last_trace.with_image and panel.last_image is None
    assert "without the picture" in panel.share_view.value and panel.attention_view.layout.display == "none"


def test_text_only_needs_no_picture(models):
    panel = qa_widget(models, [], max_new_tokens=4)
    ask(panel)
    assert panel.last_answer is None and "picture" in panel.messages[-1]
    panel.model_select.value = "after SFT, without the picture (text only)"
    ask(panel)
    assert panel.last_answer == answer(models["after SFT"], None, [QUESTION], max_new_tokens=4)[0]


# ----------------------------------------------------------------------------- asking


def test_answer_streams_with_the_top_tokens_of_each_step(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=8, text_only=None)
    panel.model_select.value = "after SFT"
    panel.image_select.value = "demo_1.png"
    streamed, tables = [], []
    panel.answer_area.observe(lambda change: streamed.append(change["new"]), names="value")
    panel.top_view.observe(lambda change: tables.append(change["new"]), names="value")
    ask(panel)
    vlm, image = models["after SFT"], Image.open(demo_images[1]).convert("RGB")
    assert panel.last_answer == answer(vlm, [image], [QUESTION], max_new_tokens=8)[0]
    assert len([s for s in streamed if s]) >= 3  # the answer arrived token by token
    assert panel.answer_area.value.endswith(html.escape(panel.last_answer))
    # The table grew a row per step while the answer streamed.
    rows = [t.count("<tr>") - 1 for t in tables if t]
    assert rows[:3] == [1, 2, 3] and rows[-1] == len(panel.last_top_tokens)

    dists = reference_steps(vlm, image, QUESTION, 8)
    assert len(panel.last_top_tokens) == len(dists)
    for top, dist in zip(panel.last_top_tokens, dists):
        values, ids = dist.topk(5)
        assert [t for t, _ in top] == [token_text(vlm.processor.tokenizer, i) for i in ids.tolist()]
        np.testing.assert_allclose([p for _, p in top], values.numpy(), rtol=1e-4, atol=1e-6)
    # Every probability shown in the table is a candidate's, to two decimals.
    shown = [float(x) for x in re.findall(r"</code> ([01]\.\d\d)</td>", panel.top_view.value)]
    assert shown == [round(p, 2) for top in panel.last_top_tokens for _, p in top]


def test_asking_again_replaces_the_answer(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=4)
    ask(panel)
    first = panel.last_trace
    ask(panel, "How many circles are there?")
    assert panel.last_trace is not first and panel.last_trace.question == "How many circles are there?"


# ----------------------------------------------------------------------------- pictures


def test_composed_picture_is_the_shapes_worlds_own_drawing(models):
    panel = qa_widget(models, max_new_tokens=4)
    assert panel.compose(TWO_RED_ONE_BLUE)
    expected = render_scene(TWO_RED_ONE_BLUE)
    assert np.array_equal(np.asarray(panel.current_image), np.asarray(expected))
    assert panel.current_name == ("composed: small red circle in the top left, large red circle in the center, "
                                  "small blue circle in the bottom right")
    assert panel.messages == [] and panel.image_select.value is None
    assert bytes(panel.preview.value).startswith(b"\x89PNG") and "composed" in panel.picture_label.value
    ask(panel, "How many circles are there?")
    assert panel.last_answer == answer(models["after pretraining"], [expected], ["How many circles are there?"],
                                       max_new_tokens=4)[0]


def test_composing_with_the_rows_and_the_draw_button(models, demo_images):
    panel = qa_widget(models, demo_images)
    assert panel.chosen_objects() == [DEFAULT_OBJECTS[0]]  # one object ticked to start
    for row, obj in zip(panel.object_rows, TWO_RED_ONE_BLUE):
        row["use"].value = True
        for key, value in obj.items():
            row[key].value = value
    panel.draw_button.click()
    assert panel.messages == []
    assert np.array_equal(np.asarray(panel.current_image), np.asarray(render_scene(TWO_RED_ONE_BLUE)))
    # A demo picture chosen again after a composition is loaded again.
    panel.image_select.value = "demo_0.png"
    assert panel.current_name == "demo_0.png"


@pytest.mark.parametrize("objects, says", [
    ([], "at least one object"),
    (TWO_RED_ONE_BLUE + [dict(shape="cross", colour="green", size="small", position="top")], "at most 3"),
    ([TWO_RED_ONE_BLUE[0], dict(TWO_RED_ONE_BLUE[2], position="top left")], "Objects 1 and 2 are both in the top left"),
    ([dict(TWO_RED_ONE_BLUE[0], shape="star")], "star"),
    ([dict(TWO_RED_ONE_BLUE[0], position="middle")], "middle"),
])
def test_impossible_pictures_get_a_message(models, demo_images, objects, says):
    panel = qa_widget(models, demo_images)
    assert not panel.compose(objects)
    assert says in panel.messages[-1] and says in html.unescape(panel.message.value)
    assert panel.current_name == "demo_0.png"  # the picture before stays


def test_impossible_picture_from_the_rows(models, demo_images):
    panel = qa_widget(models, demo_images)
    panel.object_rows[0]["use"].value = False
    panel.draw_button.click()
    assert "at least one object" in panel.messages[-1]
    panel.object_rows[0]["use"].value = panel.object_rows[1]["use"].value = True
    panel.object_rows[1]["position"].value = panel.object_rows[0]["position"].value
    panel.draw_button.click()
    assert "cell of its own" in panel.messages[-1] and panel.current_name == "demo_0.png"


def test_uploaded_picture(models):
    panel = qa_widget(models, [], max_new_tokens=4)
    grey = Image.new("LA", (30, 50), (128, 200))  # any mode is turned into RGB
    panel.upload.value = (upload_item("mine.png", png(grey)),)
    assert panel.current_name == "uploaded: mine.png" and panel.current_image.mode == "RGB"
    assert panel.image_select.value == "uploaded: mine.png" and panel.upload.value == ()
    ask(panel)
    assert panel.messages == []
    assert panel.last_answer == answer(models["after pretraining"], [panel.current_image], [QUESTION],
                                       max_new_tokens=4)[0]


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_message_never_an_exception(models, demo_images, tmp_path):
    panel = qa_widget(models, demo_images, max_new_tokens=4)
    for empty in ("", "   "):
        ask(panel, empty)
        assert panel.last_answer is None and "question" in panel.messages[-1]

    panel.upload.value = (upload_item("notes.txt", b"hello, not a picture"),)
    assert "notes.txt" in panel.messages[-1] and "not a picture" in panel.messages[-1]
    assert panel.current_name == "demo_0.png"  # the previous picture stays
    panel.upload.value = (upload_item("empty.png", b""),)
    assert "empty" in panel.messages[-1]
    assert not panel.load_upload("broken.png", png(Image.new("RGB", (40, 40)))[:60])
    assert "broken.png" in panel.messages[-1]

    ask(panel, "What is <s> this?")  # special-token text cannot go into a prompt
    assert panel.last_answer is None and "<s>" in panel.messages[-1]

    cfg = models["after pretraining"].model.config
    overlong = " ".join([QUESTION] * (cfg.max_position_embeddings // 4))
    ask(panel, overlong)
    assert panel.last_answer is None and "too long" in panel.messages[-1]
    assert html.escape("too long") in panel.message.value

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    panel = qa_widget(models, [broken])
    assert panel.current_image is None and "broken.png" in panel.messages[-1]
    ask(panel)
    assert "picture" in panel.messages[-1] and panel.last_answer is None


def test_a_failing_model_is_reported_in_the_panel(models, demo_images, monkeypatch):
    panel = qa_widget(models, demo_images, max_new_tokens=4)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(widget_module, "answer_with_attention", broken)
    ask(panel)  # no exception escapes the click
    assert panel.messages[-1] == "Something went wrong: RuntimeError: out of memory"
    assert not panel.ask_button.disabled and panel.last_answer is None
    monkeypatch.undo()

    ask(panel)
    monkeypatch.setattr(widget_module, "plot_attention_panel", broken)
    panel.layer_select.value = 0
    assert panel.messages[-1].endswith("out of memory")


# ----------------------------------------------------------------------------- attention


def test_attention_layer_head_and_token_choice(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=6)
    ask(panel)
    trace = panel.last_trace
    assert panel.attention_box.layout.display != "none"
    assert [v for _, v in panel.layer_select.options] == ["mean", *range(trace.n_layers)]
    assert [v for _, v in panel.head_select.options] == ["mean", *range(trace.n_heads)]
    assert [v for _, v in panel.token_select.options] == ["all", *range(len(trace.token_ids))]
    assert bytes(panel.attention_view.value).startswith(b"\x89PNG")

    def shown_share():
        return re.search(r"<b>(\d+)%</b>", panel.share_view.value).group(1)

    assert shown_share() == f"{float(image_share(trace).mean()):.0%}".rstrip("%")
    pictures = {bytes(panel.attention_view.value)}
    for control, value in ((panel.layer_select, 1), (panel.head_select, 2), (panel.token_select, 0)):
        control.value = value
        pictures.add(bytes(panel.attention_view.value))
    assert len(pictures) == 4  # each choice drew another picture ...
    assert panel.last_trace is trace  # ... from the same answer, not a new one
    expected = float(trace.attention[0, 1, 2][trace.image_positions].sum())
    assert shown_share() == f"{expected:.0%}".rstrip("%")
    assert "layer 1, head 2" in panel.share_view.value and "token 1" in panel.share_view.value
    assert not plt.get_fignums()  # the figures went into the widget, not into pyplot's list

    # The layer and head chosen stay for the next answer; the token goes back to the whole answer.
    ask(panel, "How many circles are there?")
    assert (panel.layer_select.value, panel.head_select.value, panel.token_select.value) == (1, 2, "all")

    panel.show_attention.value = False
    assert panel.attention_box.layout.display == "none"
    panel.show_attention.value = True
    assert panel.attention_box.layout.display != "none" and bytes(panel.attention_view.value).startswith(b"\x89PNG")


def test_an_empty_answer_is_said_not_drawn(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=0)
    ask(panel)
    assert panel.last_answer == "" and "answered with nothing" in panel.messages[-1]
    assert "no tokens" in panel.share_view.value and panel.attention_view.layout.display == "none"


def test_attention_hidden_until_asked_for(models, demo_images):
    panel = qa_widget(models, demo_images, max_new_tokens=4, show_attention=False, attention_layer=-1)
    ask(panel)
    assert panel.attention_box.layout.display == "none" and panel.last_answer is not None
    panel.show_attention.value = True
    assert panel.layer_select.value == panel.last_trace.n_layers - 1  # -1: the last layer
    assert bytes(panel.attention_view.value).startswith(b"\x89PNG")
