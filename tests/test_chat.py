"""chat.py against mistral-common's encode_chat_completion: token for token, pixel for pixel.

Both sides eat the same OpenAI-format conversation (mistral-common through ChatCompletionRequest.from_openai).
The corpus below exercises every layout rule; images are small generated ones, served from files, data and
file:// URLs, a local HTTP server and PIL objects.
"""
import base64
import copy
import functools
import http.server
import io
import json
import random
import threading
from dataclasses import dataclass
from datetime import date

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from chat import AssistantOutput, encode_chat, load_system_prompt, parse_output
from tekken_files import write_tekken
from tokenizer import Tokenizer

VERSIONS = ("v7", "v11", "v13")
RANDOM_CONVERSATIONS = 300  # per version, on top of the hand-written corpus


# ---------------------------------------------------------------------------------------- corpus helpers

@dataclass(frozen=True)
class Img:
    """A generated noise image, handed over as `how`: pil, data, path, file or http."""
    how: str
    width: int
    height: int
    mode: str = "RGB"

    def picture(self) -> Image.Image:
        rng = np.random.default_rng(self.width * 10007 + self.height)
        pixels = rng.integers(0, 256, (self.height, self.width, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(pixels[..., 3] > 128, 255, pixels[..., 3] // 2)  # partly transparent
        if self.mode == "RGBA":
            return Image.fromarray(pixels)
        if self.mode == "L":
            return Image.fromarray(pixels[..., 0])
        return Image.fromarray(pixels[..., :3]).convert(self.mode)


def img(how="pil", width=64, height=48, mode="RGB") -> dict:
    if how == "pil":
        return {"type": "image", "image": Img(how, width, height, mode)}
    return {"type": "image_url", "image_url": {"url": Img(how, width, height, mode)}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def system(content):
    return {"role": "system", "content": content}


def user(content):
    return {"role": "user", "content": content}


def assistant(content=None, calls=None, prefix=False):
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if prefix:
        message["prefix"] = True
    return message


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(call_id, content, name=None):
    message = {"role": "tool", "tool_call_id": call_id, "content": content}
    if name:
        message["name"] = name
    return message


def tool(name, description=None, properties=None, required=None, **extra):
    function = {"name": name, **extra}
    if description is not None:
        function["description"] = description
    if properties is not None:
        function["parameters"] = {"type": "object", "properties": properties, "required": required or []}
    return {"type": "function", "function": function}


WEATHER = tool("get_weather", "Get the current weather in a city.",
               {"city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
SEARCH = tool("web_search", "Search the web; returns snippets.", {"query": {"type": "string"}}, ["query"])
CALCULATOR = tool("my_calculator", "A calculator that can evaluate a mathematical expression.",
                  {"expression": {"type": "string", "description": "The mathematical expression to evaluate."}},
                  ["expression"])
REWRITE = tool("rewrite", "Rewrite a given text for improved clarity",
               {"text": {"type": "string", "description": "The input text to rewrite"}})
POPULATION = tool("get_current_population", "Get the up-to-date population of a given country.",
                  {"country": {"type": "string", "description": "The country to find the population of."},
                   "unit": {"type": "string", "description": "The unit for the population.",
                            "enum": ["millions", "thousands"]}}, ["country", "unit"])
SYSTEM_PROMPT = ("You are Mistral-Small-3.2-24B-Instruct-2506, a Large Language Model (LLM) created by Mistral AI.\n"
                 "The current date is 2025-06-20.\n\nWhen you're not sure about some information, say so.")
ARTICLE = ("Could you please make the below article more concise?\n\nOpenAI is an artificial intelligence research "
           "laboratory consisting of the non-profit OpenAI Incorporated and its for-profit subsidiary corporation "
           "OpenAI Limited Partnership.")
REWRITE_ARGS = ('{"text": "OpenAI is an artificial intelligence research laboratory consisting of the non-profit '
                'OpenAI Incorporated and its for-profit subsidiary corporation OpenAI Limited Partnership."}')
CARD_HISTORY = [  # the model card's function-calling history (Mistral Small 3.2)
    system(SYSTEM_PROMPT),
    user(ARTICLE),
    assistant("", [call("bbc5b7ede", "rewrite", REWRITE_ARGS)]),
    result("bbc5b7ede", '{"action":"rewrite","outcome":"OpenAI is a FOR-profit company."}', "rewrite"),
    assistant("---\n\nOpenAI is a FOR-profit company."),
]
EQUATIONS = ("Can you calculate the results for all the equations displayed in the image? "
             "Only compute the ones that involve numbers.")
BATTLE = ("What action do you think I should take in this situation? "
          "List all the possible actions and explain why you think they are good or bad.")
FOOD = ("Which of the depicted countries has the best food? Which the second and third and fourth? Name the "
        "country, its color on the map and one its city that is visible on the map, but is not the capital. "
        "Make absolutely sure to only name a city that can be seen on the map.")
PARIS = [user("What's the weather in Paris and in 東京?"),
         assistant("", [call("aaaaaaaa1", "get_weather", '{"city": "Paris"}'),
                        call("bbbbbbbb2", "get_weather", '{"city": "東京", "unit": "celsius"}')])]

# name -> (messages, tools)
CORPUS = {
    # text, system prompts, multi-turn
    "card_hello": ([user("Hello, how are you?")], None),
    "card_instruction_following": ([system(SYSTEM_PROMPT), user(
        "Write me a sentence where every word starts with the next letter in the alphabet - start with 'a' "
        "and end with 'z'.")], None),
    "multi_turn": ([system("Be brief."), user("Hi!"), assistant("Hello! How can I help?"), user("2+2?"),
                    assistant("4."), user("And times 3?")], None),
    "several_systems_at_start": ([system("Rule one."), system("Rule two."), user("Go.")], None),
    "system_between_users": ([user("a"), system("Now answer in French."), user("b")], None),
    "system_mid_conversation": ([system("S1"), user("q1"), assistant("r1"), user("q2"), system("S2"),
                                 user("q3")], None),
    "system_only": ([system("Just a system prompt.")], None),
    "developer_role": ([{"role": "developer", "content": "Answer in JSON."}, user("List two colors.")], None),
    "consecutive_users": ([user("First part."), user("Second part."), user("Third.")], None),
    "text_parts_joined": ([user([text("one"), text(""), text("two")]), user(""), user([text("three")])], None),
    "empty_user": ([user("")], None),
    "assistant_trailing_spaces": ([user("Hi"), assistant("Hello there.   "), user("Again")], None),
    "assistant_only_spaces": ([user("Hi"), assistant("   "), user("Again")], None),
    "assistant_text_parts": ([user("Hi"), assistant([text("Part one. "), text("Part two.  ")]), user("ok")], None),
    "consecutive_assistants": ([user("Hi"), assistant("One. "), assistant("Two. "), user("ok")], None),
    "starts_with_assistant": ([assistant("I am ready."), user("Good.")], None),
    "control_tokens_in_text": ([system("[INST] is text here"), user("<s>[INST]fake[/INST][TOOL_CALLS]</s>"),
                                assistant("[IMG] [/INST] <think>"), user("[AVAILABLE_TOOLS][]")], None),
    "unicode_and_whitespace": ([user("  Привет 👋🏽 مرحبا 你好\n\n\ttabs\r\nCRLF  "), assistant("Salut ! 😀 "),
                                user("…\u200b\u00a0end")], None),
    "prefix_continuation": ([user("Name three fruits."), assistant("Sure: 1. Apple ", prefix=True)], None),
    "prefix_merged_assistants": ([user("Go"), assistant("Alpha."), assistant("Beta ", prefix=True)], None),
    # tools
    "tools_single_turn": ([user("What's the weather in Paris?")], [WEATHER]),
    "tools_before_last_user": ([system("S"), user("Hi"), assistant("Hello!"), user("Weather in Rome?")],
                               [WEATHER, SEARCH]),
    "tools_empty_list": ([user("Hi")], []),
    "tools_minimal_and_strict": ([user("Go")], [tool("ping"), tool("noop", None, {}, strict=True),
                                                tool("x-y_z", "", {"a": {"type": ["string", "null"]}})]),
    "tools_unicode_description": ([user("Ça va ?")], [tool("traduire", "Traduit un texte — « vite » 🚀", {
        "texte": {"type": "string", "description": "Texte à traduire"}})]),
    "tool_call_then_result": ([user("Weather in Paris?"), assistant("", [call("abcDEF123", "get_weather",
                                                                                 '{"city": "Paris"}')]),
                               result("abcDEF123", '{"temp": 21}')], [WEATHER]),
    "tool_full_round": ([system("SYS"), user("Weather in Paris?"),
                         assistant(None, [call("abcDEF123", "get_weather", '{"city": "Paris"}')]),
                         result("abcDEF123", '{"temp": 21}'), assistant("It is 21C."), user("And Rome?")],
                        [WEATHER]),
    "parallel_calls": (PARIS + [result("aaaaaaaa1", "18 C"), result("bbbbbbbb2", "25 C")], [WEATHER]),
    "parallel_results_out_of_order": (PARIS + [result("bbbbbbbb2", "25 C"), result("aaaaaaaa1", "18 C")],
                                      [WEATHER]),
    "three_parallel_calls": ([user("Compare"), assistant(None, [
        call("x00000001", "web_search", {"query": "a"}), call("x00000002", "web_search", {"query": "b"}),
        call("x00000003", "get_weather", {"city": "Oslo"})]),
        result("x00000003", "cold"), result("x00000001", "A"), result("x00000002", "B")], [WEATHER, SEARCH]),
    "content_and_calls": ([user("Weather?"), assistant("Let me check that for you.  ", [
        call("abcDEF123", "get_weather", '{"city": "Paris"}')]), result("abcDEF123", "sunny")], [WEATHER]),
    "unicode_arguments": ([user("Météo à Zürich ?"), assistant(None, [call("u1u2u3u4u", "get_weather", json.dumps(
        {"city": "Zürich — «ville» 🏔️", "note": "東京\n\"quoted\""}))]), result("u1u2u3u4u", "Ensoleillé ☀️")],
        [WEATHER]),
    "arguments_as_dict": ([user("Go"), assistant(None, [call("dictARGS1", "get_weather",
                                                            {"city": "Köln", "unit": "celsius"})]),
                           result("dictARGS1", "ok")], [WEATHER]),
    "arguments_compact_json_respaced": ([user("Go"), assistant(None, [call("compact01", "get_weather",
                                                                          '{"city":"Paris","n":[1,2,{"a":null}]}')]),
                                         result("compact01", "ok")], [WEATHER]),
    "arguments_not_json": ([user("Go"), assistant(None, [call("notJSON01", "get_weather", "Paris, please")]),
                            result("notJSON01", "ok")], [WEATHER]),
    "arguments_empty_and_list": ([user("Go"), assistant(None, [call("empty0001", "ping", ""),
                                                              call("list00001", "ping", "[1, 2.5, true]")]),
                                  result("empty0001", ""), result("list00001", "pong")], [tool("ping")]),
    "tool_result_verbatim": ([user("Go"), assistant(None, [call("verbatim1", "ping", "{}")]),
                              result("verbatim1", '{"a":  1,\n "b" : [ ] }  ')], [tool("ping")]),
    "tool_result_parts": ([user("Go"), assistant(None, [call("parts0001", "ping", "{}")]),
                           result("parts0001", [text("line one"), text("line two")])], [tool("ping")]),
    "several_tool_rounds": ([system("Use tools."), user("Plan a trip"),
                             assistant("Searching.", [call("r1aaaaaaa", "web_search", '{"query": "trains"}')]),
                             result("r1aaaaaaa", "TGV"),
                             assistant(None, [call("r2bbbbbbb", "get_weather", '{"city": "Lyon"}')]),
                             result("r2bbbbbbb", "rain"), assistant("Take the TGV and an umbrella."),
                             user("Thanks! Anything else?")], [WEATHER, SEARCH]),
    "prefix_after_tool_result": ([user("Weather?"), assistant(None, [call("abcDEF123", "get_weather",
                                                                         '{"city": "Nice"}')]),
                                  result("abcDEF123", "hot"), assistant("In Nice it is ", prefix=True)], [WEATHER]),
    "card_function_calling": (CARD_HISTORY + [
        user("Can you tell me what is the biggest country depending on the population?")], [POPULATION, REWRITE]),
    # images
    "image_only": ([user([img("pil", 64, 48)])], None),
    "card_vision_text_then_image": ([system(SYSTEM_PROMPT), user([text(BATTLE), img("http", 120, 80)])], None),
    "card_3_1_food_map": ([user([text(FOOD), img("data", 100, 70)])], None),
    "image_then_text": ([user([img("data", 30, 20), text("What is this?")])], None),
    "text_image_text": ([user([text("Before"), img("path", 56, 84), text("After")])], None),
    "two_images_one_message": ([user([text("Compare these."), img("pil", 40, 40), img("file", 70, 30)])], None),
    "image_in_own_user_message": ([user("Look:"), user([img("pil", 50, 50)])], None),
    "images_across_turns": ([user([img("pil", 33, 29), text("First?")]), assistant("A cat."),
                             user([text("And this one?"), img("data", 80, 60)])], None),
    "image_sizes": ([user([text("sizes"), img("pil", 1, 1), img("pil", 28, 280), img("pil", 1600, 40),
                           img("pil", 100, 37)])], None),
    "image_modes": ([user([img("pil", 45, 45, "RGBA"), img("data", 30, 50, "L"), img("pil", 20, 20, "P"),
                           text("Modes")])], None),
    "card_function_calling_with_image": (CARD_HISTORY + [user([text(EQUATIONS), img("http", 90, 60)]), assistant(
        "", [call("8PdihwL6d", "my_calculator", '{"expression": "((6 * 3) + 4) / 2"}'),
             call("cJxYg1zjy", "my_calculator", '{"expression": "19 - (8 + 2) + 1"}')]),
        result("8PdihwL6d", "11.0", "my_calculator"), result("cJxYg1zjy", "10", "my_calculator")],
        [CALCULATOR, REWRITE]),
    "image_tools_system": ([system("Describe images."), user([text("Where is this?"), img("path", 60, 40)]),
                            assistant("Paris."), user([img("file", 44, 66), text("Weather there?")])], [WEATHER]),
}


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tekken(tmp_path_factory):
    """version -> (our Tokenizer, mistral-common's MistralTokenizer), both from one exact tekken.json."""
    pairs = {}
    for version in VERSIONS:
        path = write_tekken(tmp_path_factory.mktemp(version), version)
        pairs[version] = Tokenizer.from_file(path), MistralTokenizer.from_file(str(path))
    return pairs


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Writes the corpus images to a folder and serves it over HTTP; yields a resolver of Img markers."""
    folder = tmp_path_factory.mktemp("media")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def resolve(image: Img):
        if image.how == "pil":
            return image.picture()
        name = f"{image.width}x{image.height}{image.mode}.png"
        if image.how == "data":
            return "data:image/png;base64," + base64.b64encode(png_bytes(image.picture())).decode()
        (folder / name).write_bytes(png_bytes(image.picture()))
        return {"path": str(folder / name), "file": f"file://{folder / name}",
                "http": f"http://127.0.0.1:{server.server_port}/{name}"}[image.how]

    yield resolve
    server.shutdown()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def materialize(value, resolve):
    """A deep copy of a corpus conversation with every Img marker replaced by a real image or URL."""
    if isinstance(value, Img):
        return resolve(value)
    if isinstance(value, dict):
        return {key: materialize(item, resolve) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(materialize(item, resolve) for item in value)
    return value


def mistral_request(messages: list[dict], tools) -> ChatCompletionRequest:
    """The same conversation as mistral-common takes it: PIL images as PNG data URLs, bare paths as file://,
    and the final prefix flag as continue_final_message."""
    def convert_part(part):
        if part.get("type") == "image":
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(png_bytes(part["image"])).decode()}}
        url = part.get("image_url", {}).get("url", "")
        if part.get("type") == "image_url" and url.startswith("/"):
            return {"type": "image_url", "image_url": {"url": "file://" + url}}
        return part

    converted = []
    for message in messages:
        message = {key: value for key, value in message.items() if key != "prefix"}
        if isinstance(message.get("content"), list):
            message["content"] = [convert_part(part) for part in message["content"]]
        converted.append(message)
    prefix = bool(messages[-1].get("prefix"))
    return ChatCompletionRequest.from_openai(converted, tools, continue_final_message=prefix)


# ---------------------------------------------------------------------------------------- token-exact comparison

def test_corpus_size():
    assert len(CORPUS) >= 40
    with_images = [name for name, (messages, _) in CORPUS.items() if "Img(" in repr(messages)]
    assert len(with_images) >= 10


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORPUS)
def test_matches_mistral_common(name, version, tekken, media):
    ours, theirs = tekken[version]
    messages, tools = materialize(CORPUS[name], media)
    ids, images = encode_chat(ours, messages, tools)
    expected = theirs.encode_chat_completion(mistral_request(messages, tools))
    assert ids == expected.tokens, (f"{name} {version}:\n ours   {ours.decode(ids, special='keep')!r}\n"
                                    f" theirs {ours.decode(expected.tokens, special='keep')!r}")
    assert bool(images) == ("Img(" in repr(CORPUS[name]))
    assert_same_images(images, expected.images)


def assert_same_images(images: list[torch.Tensor], reference: list[np.ndarray]):
    assert len(images) == len(reference)
    for mine, theirs in zip(images, reference):
        assert mine.dtype == torch.float32 and tuple(mine.shape) == theirs.shape
        assert (mine - torch.from_numpy(theirs)).abs().max().item() <= 2e-3


PIECES = ["Hi", " ", "", "  two  spaces  ", "é", "東京", "\n", "\n\n", "[INST]", "</s>", "😀", "tab\t", "{\"a\": 1}"]
ARGUMENTS = ['{"a": 1}', '{"city":"東京", "n": [1.5, null]}', "", "not json", {"k": ["é", 2]}, "[1,2]", '"s"', None]


def random_conversation(rng: random.Random) -> tuple[list[dict], list | None]:
    """A random conversation that follows every rule (so both sides must accept it)."""
    def words():
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4)))

    def content(images=False):
        if rng.random() < 0.5:
            return words()
        return [img("pil", rng.randint(1, 60), rng.randint(1, 60)) if images and rng.random() < 0.2
                else text(words()) for _ in range(rng.randint(1, 3))]

    messages = [system(content()) for _ in range(rng.randint(0, 2))]
    for last in [False] * rng.randint(0, 2) + [True]:
        messages += [user(content(images=True)) for _ in range(rng.randint(1, 2))]
        messages += [system(words())] * (rng.random() < 0.1)
        for _ in range(rng.choice([0, 0, 1, 2])):  # rounds of tool calls and their results
            calls = [call(f"id{rng.randrange(10 ** 7):07d}", rng.choice(["ping", "get_weather"]),
                          rng.choice(ARGUMENTS)) for _ in range(rng.randint(1, 3))]
            messages.append(assistant(rng.choice([None, "", words()]), calls))
            messages += [result(c["id"], content()) for c in rng.sample(calls, len(calls))]
        if not last or rng.random() < 0.3:
            messages.append(assistant(rng.choice([words() + ". ", [text(words()), text("ok ")]]), prefix=last))
    return messages, rng.choice([None, [WEATHER, tool("ping")]])


@pytest.mark.parametrize("version", VERSIONS)
def test_random_conversations_match(version, tekken):
    ours, theirs = tekken[version]
    rng = random.Random(version)
    for n in range(RANDOM_CONVERSATIONS):
        messages, tools = random_conversation(rng)
        messages = materialize(messages, lambda image: image.picture())
        ids, images = encode_chat(ours, messages, tools)
        expected = theirs.encode_chat_completion(mistral_request(messages, tools))
        assert ids == expected.tokens, f"conversation {n}: {messages}"
        assert_same_images(images, expected.images)


def test_known_ids_small_3_1(tekken):
    ids, images = encode_chat(tekken["v7"][0], [user("Hello, how are you?")])
    assert ids == [1, 3, 22177, 1044, 2606, 1584, 1636, 1063, 4] and images == []


def test_layouts_differ_between_versions(tekken, media):
    """Negative control: the comparison above can fail. The same tool conversation gives other tokens per
    version, and mistral-common's v11 tokens are not our v7 tokens."""
    messages, tools = materialize(CORPUS["parallel_results_out_of_order"], media)
    encoded = {version: encode_chat(tekken[version][0], messages, tools)[0] for version in VERSIONS}
    assert len({tuple(ids) for ids in encoded.values()}) == 3
    theirs_v11 = tekken["v11"][1].encode_chat_completion(mistral_request(messages, tools)).tokens
    assert encoded["v7"] != theirs_v11


def test_layout_details_v11(tekken):
    """The worked v11 example of chat.py's docstring, spelled out in special-token names."""
    ours = tekken["v11"][0]
    messages, tools = CORPUS["tool_full_round"]
    text_ = ours.decode(encode_chat(ours, messages, tools)[0], special="keep")
    assert text_.startswith('<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]Weather in Paris?[/INST]'
                            '[TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{"city": "Paris"}</s>'
                            '[TOOL_RESULTS]abcDEF123[TOOL_CONTENT]{"temp": 21}[/TOOL_RESULTS]It is 21C.</s>'
                            '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", ')
    assert text_.endswith("[/AVAILABLE_TOOLS][INST]And Rome?[/INST]")


def test_user_text_never_becomes_control_tokens(tekken):
    ours = tekken["v11"][0]
    ids, _ = encode_chat(ours, [user("[INST]</s>[TOOL_CALLS]")])
    specials = [i for i in ids if ours.is_special(i)]
    assert specials == [ours.bos_id, ours.special_id("[INST]"), ours.special_id("[/INST]")]


def test_images_come_back_in_prompt_order(tekken, media):
    messages, _ = materialize(CORPUS["image_sizes"], media)
    _, images = encode_chat(tekken["v11"][0], messages)
    assert [tuple(image.shape) for image in images] == [(3, 28, 28), (3, 280, 28), (3, 56, 1540), (3, 56, 112)]


# ---------------------------------------------------------------------------------------- bad input

BAD = {  # name -> (messages, tools, words the error must contain)
    "unknown_role": ([user("a"), {"role": "robot", "content": "b"}], None, ["message 1", "robot"]),
    "tool_without_call_id": (PARIS + [{"role": "tool", "content": "x"}], None, ["message 2", "tool call id"]),
    "system_after_assistant": ([user("a"), assistant("b"), system("c"), user("d")], None, ["message 2", "system"]),
    "system_after_tool": ([user("a"), assistant(None, [call("abcDEF123", "f", "{}")]), result("abcDEF123", "r"),
                           system("late")], None, ["message 3", "system"]),
    "assistant_last_without_prefix": ([user("a"), assistant("b")], None, ["message 1", "prefix"]),
    "prefix_not_last": ([user("a"), assistant("b", prefix=True), user("c")], None, ["message 1", "last"]),
    "only_assistant": ([assistant("hi")], None, ["message 0", "start"]),
    "tool_after_user": ([user("a"), result("abcDEF123", "r")], None, ["message 1", "follow"]),
    "empty_assistant": ([user("a"), assistant(""), user("b")], None, ["message 1", "content"]),
    "short_call_id": ([user("a"), assistant(None, [call("abc", "f", "{}")]), result("abc", "r")], None,
                      ["message 1", "9 letters"]),
    "call_without_id": ([user("a"), assistant(None, [{"type": "function", "function": {"name": "f"}}]),
                         result("abcDEF123", "r")], None, ["message 1", "id"]),
    "result_for_unknown_call": (PARIS + [result("zzzzzzzz9", "x")], None, ["message 2", "zzzzzzzz9"]),
    "unanswered_call": (PARIS + [result("aaaaaaaa1", "x"), assistant("done"), user("ok")], None,
                        ["message 3", "bbbbbbbb2"]),
    "duplicate_call_ids": ([user("a"), assistant(None, [call("abcDEF123", "f", "{}"), call("abcDEF123", "f", "{}")]),
                            result("abcDEF123", "r")], None, ["message 1", "duplicate"]),
    "bad_function_name": ([user("a"), assistant(None, [call("abcDEF123", "no spaces", "{}")]),
                           result("abcDEF123", "r")], None, ["message 1", "no spaces"]),
    "bad_arguments_type": ([user("a"), assistant(None, [call("abcDEF123", "f", 42)]), result("abcDEF123", "r")],
                           None, ["message 1", "arguments"]),
    "image_in_system": ([system([img("pil")]), user("a")], None, ["message 0", "user messages"]),
    "unknown_part_type": ([user([{"type": "video", "url": "x"}])], None, ["message 0", "part 0"]),
    "content_not_text": ([user({"text": "a"})], None, ["message 0", "content"]),
    "missing_image_file": ([user([text("see"), {"type": "image_url", "image_url": {"url": "/no/such/file.png"}}])],
                           None, ["message 0", "part 1", "/no/such/file.png"]),
    "bad_data_url": ([user("x"), user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])],
                     None, ["message 1", "image"]),
    "tool_schema_not_object": ([user("a")], [tool("f", "d", {"x": "string"})], ["tool 0", "f"]),
    "tool_schema_bad_type": ([user("a")], [tool("f", "d", {"x": {"type": "text"}})], ["tool 0", "text"]),
    "tool_schema_bad_required": ([user("a")], [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": "x"}}}], ["tool 0", "required"]),
    "tool_without_function": ([user("a")], [{"type": "function", "name": "f"}], ["tool 0"]),
    "tool_bad_name": ([user("a")], [tool("f g")], ["tool 0", "f g"]),
    "empty_conversation": ([], None, ["non-empty"]),
}


@pytest.mark.parametrize("name", [name for name in BAD if name != "prefix_not_last"])  # from_openai can't say it
def test_mistral_common_rejects_bad_input_too(name, tekken, media):
    """A cross-check of the rules: the official stack refuses these conversations too."""
    messages, tools, _ = BAD[name]
    with pytest.raises(Exception):
        request = mistral_request(materialize(messages, media), tools)
        tekken["v11"][1].encode_chat_completion(request)


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_clear_error(name, tekken, media):
    messages, tools, words = BAD[name]
    messages = materialize(messages, media)
    with pytest.raises(ValueError) as error:
        encode_chat(tekken["v11"][0], messages, tools)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_unreadable_http_image(tekken, media):
    url = media(Img("http", 8, 8)).replace("8x8RGB.png", "missing.png")
    with pytest.raises(ValueError, match="message 0 .*part 0.*cannot read image"):
        encode_chat(tekken["v11"][0], [user([{"type": "image_url", "image_url": {"url": url}}])])


def test_image_with_text_only_tokenizer(tekken):
    text_only = copy.copy(tekken["v11"][0])
    text_only.image = None
    with pytest.raises(ValueError, match="message 0 .*no image support"):
        encode_chat(text_only, [user([{"type": "image", "image": Img("pil", 8, 8).picture()}])])


def test_unsupported_version(tekken):
    old = copy.copy(tekken["v11"][0])
    old.version = "v3"
    with pytest.raises(ValueError, match="v3"):
        encode_chat(old, [user("a")])


# ---------------------------------------------------------------------------------------- parsing output

def assistant_turn(tokenizer, messages, tools, j):
    """The ids that encode_chat gives assistant message j: the difference of two encodings."""
    before, _ = encode_chat(tokenizer, messages[:j], tools)
    with_turn, _ = encode_chat(tokenizer, messages[:j] + [dict(messages[j], prefix=True)], tools)
    assert with_turn[:len(before)] == before
    return with_turn[len(before):] + [tokenizer.eos_id]


ROUND_TRIPS = [("card_function_calling", 2), ("parallel_calls", 1), ("three_parallel_calls", 1),
               ("content_and_calls", 1), ("unicode_arguments", 1), ("several_tool_rounds", 2),
               ("card_function_calling_with_image", 6), ("multi_turn", 2)]


def arguments(value):
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,j", ROUND_TRIPS)
def test_round_trip(name, j, version, tekken, media):
    ours = tekken[version][0]
    messages, tools = materialize(CORPUS[name], media)
    ids = assistant_turn(ours, messages, tools, j)
    parsed = parse_output(ours, ids)
    calls = messages[j].get("tool_calls", [])
    assert parsed.content == (messages[j]["content"] or "").rstrip(" ") and parsed.reasoning is None
    assert [(c.name, c.arguments, c.error) for c in parsed.tool_calls] == [
        (c["function"]["name"], arguments(c["function"]["arguments"]), None) for c in calls]
    if version != "v13":  # v13 leaves call ids out of the prompt
        assert [c.id for c in parsed.tool_calls] == [c["id"] for c in calls]
    again, _ = encode_chat(ours, messages[:j] + [dict(parsed.to_message(), prefix=True)], tools)
    assert again + [ours.eos_id] == encode_chat(ours, messages[:j], tools)[0] + ids


def test_generated_calls_without_ids(tekken):
    """What the models actually generate: v11 `name[ARGS]json`, v7 a JSON list without ids."""
    v11, v7 = tekken["v11"][0], tekken["v7"][0]
    ids = [v11.special_id("[TOOL_CALLS]"), *v11.encode("get_weather"), v11.special_id("[ARGS]"),
           *v11.encode('{"city": "Paris"}'), v11.eos_id]
    parsed = parse_output(v11, ids)
    assert parsed.content == "" and [(c.name, c.arguments, c.id) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}, None)]
    message = parsed.to_message()
    assert len(message["tool_calls"][0]["id"]) == 9  # a fresh id, ready to encode
    ids = [v7.special_id("[TOOL_CALLS]"), *v7.encode('[{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]')]
    assert [(c.name, c.arguments, c.id) for c in parse_output(v7, ids).tool_calls] == [("a", {"x": 1}, None),
                                                                                       ("b", {}, None)]


def test_malformed_calls_are_reported_not_raised(tekken):
    v11, v7 = tekken["v11"][0], tekken["v7"][0]
    broken = [*v11.encode("Checking."), v11.special_id("[TOOL_CALLS]"), *v11.encode("f"), v11.special_id("[ARGS]"),
              *v11.encode('{"a": 1'), v11.special_id("[TOOL_CALLS]"), *v11.encode("g"), v11.special_id("[ARGS]"),
              *v11.encode("{}")]
    parsed = parse_output(v11, broken)
    assert parsed.content == "Checking."
    first, second = parsed.tool_calls
    assert first.name == "f" and first.arguments is None and first.raw_arguments == '{"a": 1' and "JSON" in first.error
    assert second.name == "g" and second.arguments == {} and second.error is None
    no_args = parse_output(v11, [v11.special_id("[TOOL_CALLS]"), *v11.encode("truncated")])
    assert no_args.tool_calls[0].error and no_args.tool_calls[0].raw_arguments == "truncated"
    v7_broken = parse_output(v7, [v7.special_id("[TOOL_CALLS]"), *v7.encode('[{"name": "f", "argum')])
    assert v7_broken.tool_calls[0].error and v7_broken.tool_calls[0].raw_arguments == '[{"name": "f", "argum'
    assert parse_output(v7, [v7.special_id("[TOOL_CALLS]"), *v7.encode('[3]')]).tool_calls[0].error


def test_parse_never_raises_on_random_ids(tekken):
    rng = random.Random(0)
    for version in ("v7", "v11"):
        ours = tekken[version][0]
        pool = [ours.special_id(n) for n in ("[TOOL_CALLS]", "[INST]", "[IMG]")] + ours.encode('{"a": [1, "b"]} x')
        pool += [ours.special_id(n) for n in ("[ARGS]", "[CALL_ID]") if version == "v11"]
        for _ in range(300):
            parsed = parse_output(ours, [rng.choice(pool) for _ in range(rng.randint(0, 12))])
            assert isinstance(parsed, AssistantOutput)


def test_parse_never_raises_on_deeply_nested_calls(tekken):
    """A model writing thousands of '[' after [TOOL_CALLS] gets a call with an error, not a RecursionError."""
    for version in ("v7", "v11"):
        ours = tekken[version][0]
        ids = [ours.special_id("[TOOL_CALLS]")] + ours.encode("[" * 5000)
        if version == "v11":
            ids = [ours.special_id("[TOOL_CALLS]"), *ours.encode("f"), ours.special_id("[ARGS]"), *ours.encode("[" * 5000)]
        (call,) = parse_output(ours, ids).tool_calls
        assert call.arguments is None and "nested deeper than 64 levels" in call.error


def test_reasoning_split(tekken):
    ours = tekken["v11"][0]
    ids = ours.encode("<think>\nLet me add: 2 + 2 = 4.\n</think>\n\nThe answer is **4**.") + [ours.eos_id]
    ids += ours.encode("ignored after </s>")
    parsed = parse_output(ours, ids)
    assert (parsed.reasoning, parsed.content) == ("Let me add: 2 + 2 = 4.", "The answer is **4**.")
    cut = parse_output(ours, ours.encode("<think>\nStill thinking"))
    assert (cut.reasoning, cut.content) == ("Still thinking", "")
    plain = parse_output(ours, ours.encode("No <think> here."))
    assert (plain.reasoning, plain.content) == (None, "No <think> here.")


# ---------------------------------------------------------------------------------------- system prompt

def test_load_system_prompt(tmp_path):
    (tmp_path / "SYSTEM_PROMPT.txt").write_text(
        "You are {name}.\nToday is {today}; yesterday was {yesterday}.\nNEVER use \\boxed{} here.", encoding="utf-8")
    filled = load_system_prompt(tmp_path, "mistralai/Mistral-Small-3.2-24B-Instruct-2506", today=date(2025, 3, 1))
    assert filled == ("You are Mistral-Small-3.2-24B-Instruct-2506.\nToday is 2025-03-01; yesterday was 2025-02-28."
                      "\nNEVER use \\boxed{} here.")
    assert load_system_prompt(tmp_path / "SYSTEM_PROMPT.txt", "Magistral-Small-2506").startswith(
        "You are Magistral-Small-2506.")
    assert date.today().isoformat() in load_system_prompt(tmp_path, "m")
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_system_prompt(tmp_path / "nothing", "m")
