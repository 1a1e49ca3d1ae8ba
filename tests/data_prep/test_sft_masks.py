"""Token ids and loss masks of chat data, checked against transformers' apply_chat_template on the
tokenizer megafox-to-hf exports (tokenizer_config.json carrying the chat template)."""
import json


from data_prep import sft_offline_chat as chat
from data_prep.chat_template import BUILTIN_TEMPLATES, ChatRenderer, ChatTemplate, load_chat_template
from data_prep.sft_readers import to_conversation
from data_prep.sft_tokenize import ChatTokenizer, ConversationEncoder
from tests.data_prep.dp_sft_helpers import export_hf, mistral_model, reference_mask, trained_runs

# fox1 with the assistant turns marked for transformers' return_assistant_tokens_mask
FOX1_GENERATION = BUILTIN_TEMPLATES["fox1"].replace(
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}",
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}")
# a header ending in a space: SentencePiece merges it with the answer's first word ("▁The")
SPACED = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Question: ' + message['content'] + "
          "'\\n' }}{% else %}{{ 'Answer: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}")
SPACED_GENERATION = SPACED.replace("{{ 'Answer: ' + message['content'] + eos_token + '\\n' }}",
                                   "{{ 'Answer:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}"
                                   "{% endgeneration %}{{ '\\n' }}")
# Mistral's instruct format: bos, [INST] control tokens around the user turn, no assistant header
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('no system role') }}{% endif %}"
           "{% endfor %}")


def conversations(system=True):
    recs = chat.chat_records() + chat.sharegpt_records() + chat.alpaca_records() + chat.long_records()
    convs = [to_conversation(r)[0] for r in recs]
    assert all(convs)
    return [c for c in convs if system or c[0]["role"] != "system"]


def encoder(model_file, template: ChatTemplate):
    import sentencepiece as spm

    tok = ChatTokenizer(spm.SentencePieceProcessor(model_file=str(model_file)))
    return ConversationEncoder(ChatRenderer(template, tok.special_tokens), tok, 10 ** 9, "drop")


def check_against_transformers(model_file, template, hf_dir, convs, decode_check=True):
    hf = export_hf(model_file, hf_dir, template.text)
    enc = encoder(model_file, template)
    multi_turn = trained_total = 0
    for msgs in convs:
        got = enc.encode(msgs)
        ids, mask = got.ids.tolist(), got.mask.tolist()
        assert ids == hf.apply_chat_template(msgs, tokenize=True)["input_ids"], msgs
        ref_mask, ref_ids = reference_mask(hf, msgs)
        assert ref_ids == ids and mask == ref_mask, msgs
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        runs = trained_runs(ids, mask)
        assert len(runs) == len(answers)  # one run per assistant turn, nothing else trained
        if decode_check:  # exactly the content, then the end-of-turn token
            assert [hf.decode(r) for r in runs] == [a + hf.eos_token for a in answers]
            assert all(r[-1] == hf.eos_token_id for r in runs)
        multi_turn += len(answers) > 1
        trained_total += sum(mask)
    assert multi_turn > 50 and trained_total > 10_000
    return hf


def test_fox1_ids_and_masks_equal_transformers(tokenizer, tmp_path):
    hf = check_against_transformers(tokenizer, load_chat_template("fox1"), tmp_path / "hf", conversations())
    # what an exported model is prompted with at inference
    prompt = hf.apply_chat_template([{"role": "user", "content": "What does `heapq.heappush` do?"}],
                                    tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat does `heapq.heappush` do?</s><|assistant|>\n"
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == BUILTIN_TEMPLATES["fox1"] == hf.chat_template


def test_generation_tags_follow_return_assistant_tokens_mask(tokenizer, tmp_path):
    """A template with {% generation %}: the mask is transformers' own assistant_masks."""
    path = tmp_path / "fox1_generation.jinja"
    path.write_text(FOX1_GENERATION)
    template = load_chat_template(str(path))
    assert template.uses_generation_tags
    hf = export_hf(tokenizer, tmp_path / "hf", template.text)
    enc = encoder(tokenizer, template)
    for msgs in conversations():
        got = enc.encode(msgs)
        ref = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert got.ids.tolist() == ref["input_ids"] and got.mask.tolist() == ref["assistant_masks"], msgs
    # and it trains the same tokens as fox1 located by prefix rendering
    plain = encoder(tokenizer, load_chat_template("fox1"))
    for msgs in conversations()[:100]:
        assert plain.encode(msgs).mask.tolist() == enc.encode(msgs).mask.tolist()


def test_boundary_merge_token_is_trained(tokenizer, tmp_path):
    """'Answer: ' + 'The ...': SentencePiece merges the header's space into '▁The'; that token straddles
    the span boundary, is a target, and the ids stay apply_chat_template's."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    convs = [[{"role": "user", "content": f"What does `{n}` do?"}, {"role": "assistant", "content": doc.split("\n")[0]}]
             for n, _, doc in chat.stdlib_functions()[:60]]
    for text, tags in ((SPACED, False), (SPACED_GENERATION, True)):
        path = tmp_path / f"spaced{tags}.jinja"
        path.write_text(text)
        template = load_chat_template(str(path))
        hf = export_hf(tokenizer, tmp_path / f"hf{tags}", template.text)
        enc = encoder(tokenizer, template)
        straddling = 0
        for msgs in convs:
            got = enc.encode(msgs)
            ids, mask = got.ids.tolist(), got.mask.tolist()
            assert ids == hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
            if tags:
                assert mask == hf.apply_chat_template(msgs, return_dict=True,
                                                      return_assistant_tokens_mask=True)["assistant_masks"]
            else:
                assert mask == reference_mask(hf, msgs)[0]
            first = mask.index(1)
            piece = sp.id_to_piece(ids[first])
            straddling += piece.startswith("▁") and len(piece) > 1  # ' ' of the header + the answer's start
        assert straddling > 30


def test_real_pretrained_sentencepiece(tmp_path):
    """Mistral's released 32K tokenizer: [INST]/[/INST] control tokens written by the template, bos, fox1."""
    model = mistral_model(tmp_path)
    # the package registry is reachable wherever the tests run (make test installs from it)
    assert model is not None, "mistral-common's tokenizer: neither installed nor downloadable with pip"
    path = tmp_path / "mistral.jinja"
    path.write_text(MISTRAL)
    hf = check_against_transformers(model, load_chat_template(str(path)), tmp_path / "hf_mistral",
                                    conversations(system=False), decode_check=False)
    ids = hf.apply_chat_template(conversations(system=False)[0], tokenize=True)["input_ids"]
    assert ids[0] == hf.bos_token_id and hf.convert_tokens_to_ids("[INST]") in ids
    check_against_transformers(model, load_chat_template("fox1"), tmp_path / "hf_fox1", conversations())


def test_exported_template_files(tokenizer, tmp_path):
    """tokenizer_config.json and chat_template.jinja carry the same template; transformers round-trips it;
    exporting again without a template leaves none behind."""
    from transformers import AutoTokenizer

    from checkpoints_tools.hf_tokenizer import write_hf_tokenizer

    hf = export_hf(tokenizer, tmp_path / "a", BUILTIN_TEMPLATES["fox1"])
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["fox1"]
    hf.save_pretrained(tmp_path / "b")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "b"), local_files_only=True)
    assert again.chat_template == BUILTIN_TEMPLATES["fox1"]
    from pathlib import Path

    write_hf_tokenizer(Path(tokenizer), tmp_path / "a", 1024)
    assert not (tmp_path / "a" / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a"), local_files_only=True).chat_template is None
