"""Images in conversations: every accepted form becomes Hugging Face content blocks with an absolute path (or the data
URI as given), and every bad image is named by file, line and place in the sample. Tiny pictures made here."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from qwen_tune.data.images import ImageError, image_size, load_image, resolve_image
from qwen_tune.data.read import load_conversations, load_preference_pairs, load_prompts
from qwen_tune.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
RED, BLUE = (255, 0, 0), (0, 0, 255)


def png_bytes(colour, mode="RGB", size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_uri(colour) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour)).decode()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """tmp/data with img/red.png, img/blue.png, a PNG cut to 20 bytes and a JPEG cut in half."""
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    (d / "img" / "red.png").write_bytes(png_bytes(RED))
    (d / "img" / "blue.png").write_bytes(png_bytes(BLUE))
    (d / "img" / "bad.png").write_bytes(png_bytes(RED)[:20])
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 64).convert("RGB").save(buf, "JPEG", quality=95)
    (d / "img" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return d


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def problems(loader, path) -> list[str]:
    with pytest.raises(DataError) as info:
        loader(path)
    return info.value.problems


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(ref) -> dict:
    return {"type": "image", "image": str(ref)}


def chat(user_content, reply="red") -> dict:
    return {"messages": [{"role": "user", "content": user_content}, {"role": "assistant", "content": reply}]}


def seed(*turns, images=None) -> dict:
    record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    return record if images is None else {**record, "images": images}


# ---------------------------------------------------------------- accepted forms


def test_content_lists_become_blocks_relative_to_the_data_file_not_the_cwd(data_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "img").mkdir(parents=True)
    (elsewhere / "img" / "red.png").write_bytes(png_bytes(BLUE))  # a decoy where the cwd would lead
    monkeypatch.chdir(elsewhere)
    red, blue, uri = data_dir / "img" / "red.png", data_dir / "img" / "blue.png", data_uri(RED)
    records = [
        chat([{"type": "image", "image": "img/red.png"}, text("What colour?")]),
        chat([{"type": "image", "path": "img/red.png"}, {"type": "image", "url": f"file://{blue}"}, text("Two?")]),
        chat([{"type": "image_url", "image_url": {"url": str(red)}}, {"type": "image_url", "image_url": uri}]),
        {"messages": [{"role": "user", "content": [text("Say "), text("red")]},
                      {"role": "assistant", "content": [text("re"), text("d")]}]},
    ]
    jsonl(data_dir / "train.jsonl", *records)
    convs = load_conversations("../data/train.jsonl")
    assert [c.messages[0]["content"] for c in convs] == [
        [image(red), text("What colour?")],
        [image(red), image(blue), text("Two?")],
        [image(red), {"type": "image", "image": uri}],  # a data URI is kept as it is
        "Say red",  # no image: the text the list renders, as a string
    ]
    assert [c.messages[1] for c in convs] == [{"role": "assistant", "content": "red"}] * 4


def test_sharegpt_placeholders_take_the_listed_images_in_order(data_dir):
    red, blue = data_dir / "img" / "red.png", data_dir / "img" / "blue.png"
    call = json.dumps({"name": "camera", "arguments": {}})
    records = [
        seed(("human", "<image>\nCompare <image> and  this."), ("gpt", "red, blue"), images=["img/red.png", str(blue)]),
        seed(("human", "look"), ("gpt", "calling"), ("function_call", call), ("observation", "<image>"),
             ("gpt", "red"), images=[f"file://{red}"]),
        {"messages": [{"role": "user", "content": "First <image>"}, {"role": "assistant", "content": "red"},
                      {"role": "user", "content": "then<image>"}, {"role": "assistant", "content": "blue"}],
         "images": ["img/red.png", "img/blue.png"]},
    ]
    convs = load_conversations(jsonl(data_dir / "train.jsonl", *records))
    assert convs[0].messages[0]["content"] == [image(red), text("\nCompare "), image(blue), text(" and  this.")]
    assert convs[0].messages[1] == {"role": "assistant", "content": "red, blue"}
    assert convs[1].messages[2] == {"role": "tool", "content": [image(red)]}  # a tool's result may be an image
    assert [m["content"] for m in convs[2].messages] == [[text("First "), image(red)], "red",
                                                         [text("then"), image(blue)], "blue"]


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_every_file_format_gives_the_same_blocks(data_dir, fmt):
    records = [
        {"id": "hf", "messages": [{"role": "user", "content": [{"type": "image", "image": "img/red.png"}, text("Colour?")]},
                                  {"role": "assistant", "content": [text("red")]}]},
        {"id": "sharegpt", **seed(("human", "<image>Colour?"), ("gpt", "blue"), images=["img/blue.png"])},
    ]
    want = [c.messages for c in load_conversations(jsonl(data_dir / "want.jsonl", *records))]
    path, columns = data_dir / f"train.{fmt}", ["id", "messages", "conversations", "images"]
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]), path)  # every column
    assert [c.messages for c in load_conversations(path)] == want
    assert want[0][0]["content"] == [image(data_dir / "img" / "red.png"), text("Colour?")] and want[0][1]["content"] == "red"


def test_preference_pairs_and_prompts_carry_images_in_the_prompt(data_dir):
    red = data_dir / "img" / "red.png"
    pairs = [
        {**seed(("human", "<image>Which colour?")), "chosen": "red", "rejected": "blue", "images": ["img/red.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": "img/red.png"}, text("Which colour?")]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
        {"prompt": "<image>Which colour?", "chosen": "red", "rejected": "blue", "images": ["img/red.png"]},
    ]
    want = [{"role": "user", "content": [image(red), text("Which colour?")]}]
    for pair in load_preference_pairs(jsonl(data_dir / "pairs.jsonl", *pairs)):
        assert (pair.prompt, pair.chosen, pair.rejected) == (want, [{"role": "assistant", "content": "red"}],
                                                             [{"role": "assistant", "content": "blue"}])
    (prompt,) = load_prompts(jsonl(data_dir / "prompts.jsonl", {"prompt": "<image>Which colour?",
                                                                "images": ["img/red.png"], "answer": "red"}))
    assert prompt.messages == want and prompt.columns == {"answer": "red"}
    bad = jsonl(data_dir / "bad.jsonl", {"prompt": "<image>q", "chosen": "<image>", "rejected": "b",
                                         "images": ["img/red.png", "img/blue.png"]})
    assert problems(load_preference_pairs, bad) == [
        f"{bad}:1: chosen has an <image> placeholder in an assistant turn; an assistant turn cannot carry an image: "
        "the model only generates text"
    ]


def test_text_only_samples_are_unchanged(data_dir):
    """Without an `images` list, "<image>" is just text, byte for byte."""
    records = [chat("Write <image> literally  "), {**GOOD, "images": []}]
    convs = load_conversations(jsonl(data_dir / "train.jsonl", *records))
    assert [c.messages for c in convs] == [records[0]["messages"], GOOD["messages"]]


# ---------------------------------------------------------------- problems, each named by file:line and place

BAD = [  # (record on line 2, its one problem; <D> is the data file's directory)
    (chat([image("img/nope.png"), text("q")]),
     "messages[0].content[0].image is \"img/nope.png\": no such file <D>/img/nope.png "
     "(a relative path starts at the data file's directory)"),
    (chat([image("img"), text("q")]), 'messages[0].content[0].image is "img": cannot read <D>/img (Is a directory)'),
    (chat([{"type": "image", "image": 5}]),
     "messages[0].content[0].image is 5: expected an image's local path or a data:image/...;base64,... URI"),
    (chat([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text("q")]),
     'messages[0].content[0].image_url.url is "https://example.com/a.png": nothing is downloaded; '
     "save the image and give its local path"),
    (seed(("human", "<image>q"), ("gpt", "a"), images=["http://example.com/a.png"]),
     'images[0] is "http://example.com/a.png": nothing is downloaded; save the image and give its local path'),
    (chat([{"type": "image_url", "image_url": "data:image/png;base64,aGVsbG8="}]),
     'messages[0].content[0].image_url is "data:image/png;base64,aGVsbG8=": the data URI is not a readable image '
     "(not an image file)"),
    (chat([image("data:text/plain;base64,aGk=")]),
     'messages[0].content[0].image is "data:text/plain;base64,aGk=": a data URI not of the form '
     "data:image/<type>;base64,<data>"),
    (seed(("human", "<image><image>q"), ("gpt", "a"), images=["img/red.png"]),
     "images lists 1 image but the turns have 2 <image> placeholders; each <image> takes the next image of the list"),
    (seed(("human", "<image>q"), ("gpt", "a"), images=["img/red.png", "img/blue.png"]),
     "images lists 2 images but the turns have 1 <image> placeholder; each <image> takes the next image of the list"),
    (seed(("human", "q"), ("gpt", "a"), images=["img/red.png"]),
     "images lists 1 image but no turn has an <image> placeholder; put <image> in the user's text where each image goes"),
    ({**seed(("human", "<image>q"), ("gpt", "a")), "images": "img/red.png"},
     'images is "img/red.png"; expected a list of image paths, one per <image> in the text'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [image("img/red.png")]}]},
     "messages[1].content[0] is an image in an assistant turn; "
     "an assistant turn cannot carry an image: the model only generates text"),
    (seed(("human", "q"), ("gpt", "<image>"), images=["img/red.png"]),
     "conversations[1].value has an <image> placeholder in an assistant turn; "
     "an assistant turn cannot carry an image: the model only generates text"),
    ({"messages": [{"role": "system", "content": [image("img/red.png"), text("s")]}, *GOOD["messages"]]},
     "messages[0].content[0] is an image in a system turn; "
     "the Qwen chat templates refuse images in the system turn; put it in a user turn"),
    (chat([]), "messages[0].content has no text and no image"),
    (chat([text(" ")]), "messages[0].content has no text and no image"),
    (chat([{"type": "video", "video": "clip.mp4"}, text("q")]),
     "messages[0].content[0] is a video; video is not supported yet (images are)"),
    (chat([{"type": "audio", "audio": "a.wav"}, text("q")]),
     'messages[0].content[0].type is "audio"; expected one of text, image, image_url'),
    (chat(["q"]), 'messages[0].content[0] is "q"; expected a block like {"type": "text", "text": "..."} '
     'or {"type": "image", "image": "path"}'),
    (chat([{"type": "image", "image": "img/red.png", "detail": "high"}]),
     'messages[0].content[0] has an unknown field "detail" for an image block; an image block has type, image, path, url'),
    (chat([{"type": "image_url", "image_url": {"url": "img/red.png", "detail": "low"}}]),
     'messages[0].content[0].image_url has an unknown field "detail"; expected {"url": "..."}'),
    (chat([{"type": "image", "image": "img/red.png", "path": "img/red.png"}]),
     'messages[0].content[0] has both "image" and "path"; use one'),
    (chat([{"type": "image"}, text("q")]),
     'messages[0].content[0] has no "image"; expected {"type": "image", "image": "path"}'),
    (chat([text(5)]), "messages[0].content[0].text is 5; expected a string"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_image_input_is_named_with_file_line_and_place(data_dir, record, message):
    record = json.loads(json.dumps(record).replace("<D>", str(data_dir)))
    path = jsonl(data_dir / "train.jsonl", GOOD, record)
    assert problems(load_conversations, path) == [f"{path}:2: " + message.replace("<D>", str(data_dir))]


def test_unreadable_images_and_bad_data_uris_are_problems(data_dir):
    """A cut PNG (its first 20 bytes), a JPEG cut in half and base64 that does not decode, all in one run."""
    records = [chat([image("img/bad.png"), text("q")]), seed(("human", "<image>q"), ("gpt", "a"), images=["img/cut.jpg"]),
               chat([image("data:image/png;base64,@@@@"), text("q")])]
    path = data_dir / "train.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    a, b, c = (n for n, line in enumerate(path.read_text().splitlines(), 1) if line == " {")  # where each sample starts
    found = problems(load_conversations, path)
    assert len(found) == 3
    assert found[0].startswith(f'{path}:{a} (sample 0): messages[0].content[0].image is "img/bad.png": '
                               f"{data_dir}/img/bad.png is not a readable image (")
    assert found[1].startswith(f'{path}:{b} (sample 1): images[0] is "img/cut.jpg": {data_dir}/img/cut.jpg is not a '
                               "readable image (image file is truncated")
    assert found[2].startswith(f'{path}:{c} (sample 2): messages[0].content[0].image is "data:image/png;base64,@@@@": '
                               "the data URI does not decode as base64 (")


# ---------------------------------------------------------------- images.py


def test_resolve_load_and_digest(data_dir, tmp_path):
    red = data_dir / "img" / "red.png"
    assert resolve_image("img/red.png", data_dir) == str(red) == resolve_image(f"file://{red}", tmp_path)
    assert resolve_image(str(red), tmp_path) == str(red)
    with pytest.raises(ImageError, match='a file URI on the host "server"'):
        resolve_image("file://server/img/red.png", data_dir)
    missing = data_dir / "img" / "nope.png"
    with pytest.raises(ImageError) as info:  # absolute: no hint about the data file's directory
        resolve_image(str(missing), tmp_path)
    assert str(info.value) == f"no such file {missing}"
    uri = data_uri(RED)
    assert resolve_image(uri, tmp_path) == uri
    for ref in (str(red), uri):
        img = load_image(ref)
        assert (img.mode, img.size, img.getpixel((5, 5))) == ("RGB", (32, 32), RED) and image_size(ref) == (32, 32)
    grey = tmp_path / "grey.png"
    grey.write_bytes(png_bytes(128, mode="L"))
    assert load_image(str(grey)).getpixel((0, 0)) == (128, 128, 128)


def test_load_image_turns_the_picture_upright(tmp_path):
    """EXIF orientation 6 (rotate 90 degrees clockwise to view): a 32x16 photo is shown, and loaded, 16x32."""
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 16), RED).save(path, exif=exif)
    assert load_image(str(path)).size == image_size(str(path)) == (16, 32)
