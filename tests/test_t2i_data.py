"""The text-to-image demo's captions, rendered images, prompt-accuracy metric and text encoder."""

from __future__ import annotations

import logging

import pytest
import torch

from ilf_runtime.fashion.captions import (
    CLASS_WORDS,
    COLOURS,
    HELD_OUT,
    TEMPLATES,
    caption,
    fix_articles,
    parse,
    training_pairs,
)


def test_every_caption_parses_back_to_its_pair():
    g = torch.Generator().manual_seed(0)
    for c in range(len(CLASS_WORDS)):
        for k in range(len(COLOURS)):
            assert parse(caption(c, k, plain=True)) == (c, k)
            for _ in range(20):
                cap = caption(c, k, g)
                assert parse(cap) == (c, k), cap


def test_every_template_and_word_parses():
    for c, words in enumerate(CLASS_WORDS):
        for k, colour in enumerate(COLOURS):
            for t in TEMPLATES:
                for gw in words:
                    for cw in colour.words:
                        text = fix_articles(t.format(colour=cw, garment=gw))
                        assert parse(text) == (c, k), text


def test_prompts_that_cannot_be_scored():
    assert parse("a red dinosaur") is None  # unknown garment
    assert parse("a beige sneaker") is None  # unknown colour
    assert parse("a red sneaker and a blue bag") is None  # two of each
    assert parse("A RED ANKLE BOOT") == (9, 0)  # "ankle boot" is not also a "boot"
    assert parse("a blue t-shirt") == (0, 4)  # "t-shirt" is not also a "shirt"
    assert fix_articles("a orange bag") == "an orange bag"


def test_held_out_pairs():
    pairs = training_pairs()
    assert len(HELD_OUT) == 6 and not HELD_OUT & set(pairs)
    assert len(pairs) + len(HELD_OUT) == len(CLASS_WORDS) * len(COLOURS)
    assert {k for _, k in HELD_OUT} == set(range(len(COLOURS)))  # one per colour


def test_tint_keeps_intensity_in_the_largest_channel():
    from ilf_runtime.fashion.scenes import tint

    img = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    rgb = (tint(img, torch.tensor([0, 1, 2, 5])) + 1) / 2  # (4, 3, 16, 16)
    ref = torch.nn.functional.interpolate(img.float().div(255).unsqueeze(1), size=(16, 16), mode="area")
    torch.testing.assert_close(rgb.amax(1, keepdim=True), ref)


@pytest.fixture(scope="module")
def test_set():
    from ilf_runtime.fashion.data import load_fashion_mnist
    from ilf_runtime.fashion.scenes import CaptionedSet

    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return CaptionedSet("test")


def test_train_split_never_draws_held_out_pairs():
    from ilf_runtime.fashion.data import load_fashion_mnist
    from ilf_runtime.fashion.scenes import CaptionedSet

    try:
        load_fashion_mnist("train")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    b = CaptionedSet("train").draw(3000, torch.Generator().manual_seed(1))
    pairs = set(zip(b.classes.tolist(), b.colours.tolist()))
    assert not pairs & HELD_OUT and len(pairs) == len(training_pairs())
    assert [parse(c) for c in b.captions] == list(zip(b.classes.tolist(), b.colours.tolist()))


def test_metric_ceiling_and_shuffled_control(test_set):
    from ilf_runtime.fashion.prompt_metric import prompt_accuracy, shuffled

    b = test_set.draw(1000, torch.Generator().manual_seed(0))
    images = (b.images + 1) / 2
    top = prompt_accuracy(images, b.captions)
    assert top["colour"]["acc"] == 1.0 and top["class"]["acc"] > 0.8 and top["unscored"] == 0
    low = prompt_accuracy(images, shuffled(b.captions))
    assert abs(low["class"]["acc"] - 0.1) < 0.04 and abs(low["colour"]["acc"] - 1 / 6) < 0.05
    assert low["full"]["acc"] < 0.05


def test_metric_counts_unreadable_prompts_apart(test_set):
    from ilf_runtime.fashion.prompt_metric import prompt_accuracy

    b = test_set.draw(4, torch.Generator().manual_seed(0))
    r = prompt_accuracy((b.images + 1) / 2, [b.captions[0], "a dinosaur", "a beige sneaker", b.captions[3]])
    assert r["n"] == 2 and r["unscored"] == 2
    with pytest.raises(ValueError, match="RGB images"):
        prompt_accuracy(torch.zeros(1, 1, 16, 16), ["a red bag"])


@pytest.fixture(scope="module")
def encoder():
    from ilf_runtime import text_encoders as t2i

    try:
        t2i.encoder_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return t2i


def test_encoder_masks_empty_prompt_and_truncation(encoder, caplog):
    emb, mask = encoder.encode(["a red sneaker", "", "an image of a tangerine ankle boot"])
    assert emb.shape == (3, encoder.MAX_TOKENS, 384) and mask.shape == (3, encoder.MAX_TOKENS)
    assert mask.sum(1).tolist() == [6, 2, 10]  # [CLS] ... [SEP]; the empty prompt is [CLS] [SEP]
    long = " ".join(["a red sneaker"] * 10)
    with caplog.at_level(logging.WARNING):
        emb, mask = encoder.encode([long])
    assert mask.sum() == encoder.MAX_TOKENS
    assert "the rest is cut" in caplog.text
    # padding does not change the states of the real tokens
    e16, _ = encoder.encode(["a red sneaker"], 16)
    e32, _ = encoder.encode(["a red sneaker"], 32)
    torch.testing.assert_close(e16[:, :6], e32[:, :6], rtol=1e-5, atol=1e-5)
