"""The chat template: round trips, loss masks exactly on assistant spans, modes, prompts."""

import pytest
from hypothesis import given, settings, strategies as st

from jaxllm.data import DataError, Tokenizer, prompt_ids, record_to_messages, render_chat, render_text
from jaxllm.data.chat import render_chats

TOKENIZER = Tokenizer.load("default")

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where was Ana Lopez born?"},
    {"role": "assistant", "content": "Lisbon"},
    {"role": "user", "content": "And when?"},
    {"role": "assistant", "content": "March 3, 1971"},
]

messages_strategy = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                           "content": st.text(alphabet=st.characters(blacklist_characters="\u2581<",
                                                                     blacklist_categories=("Cs",)), max_size=30)}),
    min_size=1, max_size=6)


def _assistant_spans(messages, ids):
    """Expected mask built independently: walk the ids marker by marker."""
    expected = [0] * len(ids)
    position = 1  # after BOS
    for message in messages:
        assert ids[position] == TOKENIZER.role_ids[message["role"]]
        length = len(TOKENIZER.encode(message["content"]))
        if message["role"] == "assistant":
            for i in range(position + 1, position + 1 + length + 1):  # content and its EOS
                expected[i] = 1
            assert ids[position + 1 + length] == TOKENIZER.eos_id
            position += length + 2
        else:
            position += length + 1
    assert position == len(ids)
    return expected


def test_default_template_layout():
    ids, mask = render_chat(CONVERSATION[1:3], TOKENIZER)
    question = TOKENIZER.encode("Where was Ana Lopez born?")
    answer = TOKENIZER.encode("Lisbon")
    assert ids == [2, 5, *question, 6, *answer, 3]
    assert mask == [0, 0] + [0] * len(question) + [0] + [1] * len(answer) + [1]


@settings(max_examples=80, deadline=None)
@given(messages_strategy)
def test_round_trip_and_mask_exactly_on_assistant_content_and_eos(messages):
    ids, mask = render_chat(messages, TOKENIZER)
    assert TOKENIZER.decode(ids) == render_text(messages)
    assert mask == _assistant_spans(messages, ids)


def test_multi_turn_masks_every_answer_and_nothing_else():
    ids, mask = render_chat(CONVERSATION, TOKENIZER)
    trained = TOKENIZER.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Lisbon" + "March 3, 1971"
    assert sum(mask) == len(TOKENIZER.encode("Lisbon")) + len(TOKENIZER.encode("March 3, 1971")) + 2


def test_response_only_mode_trains_the_answers_with_an_empty_prompt():
    ids, mask = render_chat(CONVERSATION, TOKENIZER, mode="response_only")
    assert TOKENIZER.decode(ids) == "<|assistant|>Lisbon<|assistant|>March 3, 1971"
    assert TOKENIZER.user_id not in ids and TOKENIZER.system_id not in ids
    assert sum(mask) == sum(render_chat(CONVERSATION, TOKENIZER)[1])


def test_all_tokens_mode_trains_everything_but_bos():
    ids, mask = render_chat(CONVERSATION, TOKENIZER, mode="all_tokens")
    assert ids == render_chat(CONVERSATION, TOKENIZER)[0]
    assert mask == [0] + [1] * (len(ids) - 1)


def test_prompt_ids_end_with_the_assistant_marker_and_prefix_the_full_rendering():
    prompt = prompt_ids(CONVERSATION[:2], TOKENIZER)
    full, _ = render_chat(CONVERSATION[:3], TOKENIZER)
    assert prompt[-1] == TOKENIZER.assistant_id
    assert full[:len(prompt)] == prompt
    assert render_text(CONVERSATION[:2], add_generation_prompt=True) == TOKENIZER.decode(prompt)


def test_render_chats_equals_render_chat_one_by_one():
    conversations = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": ""}]]
    assert render_chats(conversations, TOKENIZER) == [render_chat(c, TOKENIZER) for c in conversations]


def test_prompt_response_records_become_a_user_assistant_pair():
    assert record_to_messages({"prompt": "Q?", "response": "A"}) == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]


def test_unknown_mode_is_an_error():
    with pytest.raises(DataError, match="chat mode"):
        render_chat(CONVERSATION, TOKENIZER, mode="chatty")
