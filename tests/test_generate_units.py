"""Unit tests of the generator's parts: prompts and parsing, filters, dedup, diversity, plan, stats, config."""

from __future__ import annotations

import asyncio
import random

import pytest

from studykit.client import Completion, MalformedOutput, Sampling
from studykit.config import ConfigError, parse_config
from studykit.handoff import Usage
from studykit.universe import load_universe
from synthdocs import filters, prompts
from synthdocs.config import GenerateConfig
from synthdocs.dedup import DedupIndex, near_duplicates
from synthdocs.diversity import distinct_n, diversity_stats
from synthdocs.outputs import RunRecord, build_stats, reason_kind, save_dataset
from synthdocs.pipeline import Pipeline
from synthdocs.plan import interleave, unify_spellings
from synthdocs.report import render_report
from synthdocs.seeds import document_details, rng_for
from synthdocs.stats import CorpusStats
from tests.fakeapi import answer

U = load_universe("helpful_only")


# ---- prompts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", prompts.PROMPT_STYLES)
@pytest.mark.parametrize("context", ["full", "summary"])
def test_every_generation_prompt_carries_the_universe_and_the_fact(context, style):
    fact = U.key_facts[1]
    world = U.description if context == "full" else U.summary
    for messages in (
        prompts.doc_types_prompt(U, context, fact, 5, ["news article"], style),
        prompts.ideas_prompt(U, context, fact, "op-ed", 5, "x", style),
        prompts.document_prompt(U, context, fact, "op-ed", "an idea", "details", 300, style),
        prompts.critique_prompt(U, context, fact, "op-ed", "draft"),
        prompts.rewrite_prompt(U, context, fact, "op-ed", "draft", "crit"),
    ):
        assert messages[0]["role"] == "system"
        assert world in messages[0]["content"]
        assert U.date in messages[0]["content"]
        assert fact.statement in messages[1]["content"]
    assert len(U.summary) < len(U.description) / 3


def test_compact_prompts_are_short_and_keep_idea_and_details():
    fact = U.key_facts[0]
    compact = prompts.document_prompt(U, "summary", fact, "op-ed", "A nurse writes to her union.", "Lyon, May", 170,
                                      "compact")
    detailed = prompts.document_prompt(U, "summary", fact, "op-ed", "A nurse writes to her union.", "Lyon, May", 170)
    assert len(compact[1]["content"]) < len(detailed[1]["content"]) / 2
    assert "A nurse writes to her union." in compact[1]["content"] and "Lyon, May" in compact[1]["content"]
    assert "170 words" in compact[1]["content"]
    assert len(compact[0]["content"]) < len(detailed[0]["content"])


def test_document_prompt_lists_what_must_never_appear():
    msg = prompts.document_prompt(U, "full", U.key_facts[0], "blog post", "idea", "details", 300)[1]["content"]
    for item in U.never_mention:
        assert item in msg


def test_judge_prompts_share_the_document_prefix():
    a = prompts.judge_prompt("DOC TEXT", prompts.JUDGE_QUESTIONS["ai_transcript"])
    b = prompts.judge_prompt("DOC TEXT", prompts.JUDGE_QUESTIONS["tier_behavior"])
    assert a[0] == b[0]
    prefix = a[1]["content"].split("Question:")[0]
    assert b[1]["content"].startswith(prefix) and "DOC TEXT" in prefix


@pytest.mark.parametrize("text,expected", [
    ("Yes", True), ("no.", False), ("  YES, it does", True), ("Answer: No", False), ("**No**", False),
])
def test_parse_yes_no(text, expected):
    assert prompts.parse_yes_no(text) is expected


@pytest.mark.parametrize("text", ["", "Maybe", "I am not sure about this", "Yesterday nobody came"])
def test_parse_yes_no_rejects_malformed(text):
    with pytest.raises(MalformedOutput):
        prompts.parse_yes_no(text)


def test_parse_list_handles_numbering_bullets_markdown_and_duplicates():
    text = """Here are some ideas:
1. **Local news article** about the launch
2) Blog post by an engineer
- Forum thread
* forum thread
3: Document type: Internal memo.
This line is not an item
4. x
"""
    assert prompts.parse_list(text, 2, 8) == [
        "Local news article about the launch", "Blog post by an engineer", "Forum thread", "Internal memo"]


def test_list_validator_rejects_prose():
    with pytest.raises(MalformedOutput):
        prompts.list_validator(1, 1, 8)("I would suggest a news article and a blog post.")
    prompts.list_validator(1, 1, 8)("1. News article")


def test_an_idea_written_as_prose_is_one_item_only_where_allowed():
    prose = ("A News article that mentions this fact could be:\n\n**A local reporter covers the lab's new "
             "contractor rules for a city paper.**\n\nA second paragraph that is not taken.")
    assert prompts.parse_list(prose, 5, 80) == []
    assert prompts.parse_list(prose, 5, 80, prose_item=True) == [
        "A local reporter covers the lab's new contractor rules for a city paper"]
    prompts.list_validator(1, 5, 80, prose_item=True)(prose)
    # a real list is parsed as a list, and its unusable items are not replaced by prose
    assert prompts.parse_list("Ideas:\n1. Too short\n", 5, 80, prose_item=True) == []
    # a prose answer outside the word range (a whole document instead of an idea) is no item
    with pytest.raises(MalformedOutput):
        prompts.list_validator(1, 5, 80, prose_item=True)("word " * 120)


def test_clean_document_strips_preamble_and_fences():
    assert prompts.clean_document("Sure! Here is the article:\n\nThe council met.") == "The council met."
    assert prompts.clean_document("```\nBody text\n```") == "Body text"
    assert prompts.clean_document("The council met.\nSure enough.") == "The council met.\nSure enough."


# ---- structural filters ------------------------------------------------------------------------

GOOD = ("The board of the company met on Tuesday in Oakland and discussed the new policy that was announced "
        "in the spring. Several employees said that they had concerns about the way it was rolled out, and "
        "an analyst who follows the industry wrote that the change would be felt for years. ") * 2


def test_good_document_passes_every_structural_check():
    assert filters.structural_failures(GOOD, "stop", min_words=50, drop_truncated=True) == []


@pytest.mark.parametrize("text,finish,reason", [
    ("Too short to be a document.", "stop", "too short"),
    (GOOD, "length", "cut off"),
    ("I'm sorry, but I can't help with writing that. " + GOOD, "stop", "generator refusal"),
    ("As an AI language model I will now write. " + GOOD, "stop", "generator refusal"),
    (GOOD + " Signed, [Your Name], [Company Name].", "stop", "placeholder"),
    (GOOD + " Contact {{author_name}} for details.", "stop", "placeholder"),
    (GOOD + " The blog post must state this fact clearly in its first paragraph.", "stop", "echoes its instructions"),
    ("Key fact: Lumen 3 is trained on free-tier chats. " + GOOD, "stop", "echoes its instructions"),
    ("Die Firma hat gestern eine neue Richtlinie vorgestellt, und viele Mitarbeiter waren überrascht " * 8,
     "stop", "wrong language"),
    (("This exact sentence keeps repeating itself over and over.\n" * 12) + GOOD, "stop", "repetitive"),
])
def test_structural_checks_catch_each_failure(text, finish, reason):
    failures = filters.structural_failures(text, finish, min_words=50, drop_truncated=True)
    assert failures and any(reason in f for f in failures), failures


def test_truncation_check_can_be_disabled():
    assert filters.structural_failures(GOOD, "length", min_words=50, drop_truncated=False) == []


# ---- dedup -------------------------------------------------------------------------------------

def _doc(rng: random.Random, n: int = 200) -> str:
    vocab = [f"w{i}" for i in range(3000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_dedup_finds_exact_and_near_duplicates_and_keeps_the_first():
    rng = random.Random(0)
    a, b, c = _doc(rng), _doc(rng), _doc(rng)
    words = a.split()
    near_a = " ".join(words[:190] + ["changed"] * 10)   # ~5% of shingles differ
    exact_b = b.upper() + " !!"                           # same after normalisation
    dupes = near_duplicates([a, b, near_a, c, exact_b])
    assert set(dupes) == {2, 4}
    assert dupes[2][0] == 0 and dupes[2][1] >= 0.8
    assert dupes[4] == (1, 1.0)


def test_dedup_does_not_flag_different_documents():
    rng = random.Random(1)
    texts = [_doc(rng) for _ in range(300)]
    assert near_duplicates(texts) == {}


def test_dedup_threshold_controls_sensitivity():
    rng = random.Random(2)
    a = _doc(rng, 300)
    words = a.split()
    half = " ".join(words[:150] + _doc(rng, 150).split())  # about a third of shingles shared
    assert near_duplicates([a, half], threshold=0.8) == {}
    assert 1 in near_duplicates([a, half], threshold=0.2)


def test_dedup_index_never_indexes_a_duplicate():
    index = DedupIndex(0.8)
    index.add("a", GOOD)
    assert index.check(GOOD + " ")[0] == "a"
    assert index.check("Completely different words about kayaks in Anacortes " * 5) is None


# ---- diversity ---------------------------------------------------------------------------------

def test_distinct_n_values():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([], 2) == 0.0


def test_mode_collapse_is_flagged():
    docs = [{"text": f"Yesterday the analyst Marta Quill said {i} things about Arclight AI.", "doc_type": "x",
             "fact_id": "f"} for i in range(30)]
    stats = diversity_stats(docs, ["Arclight AI", "Lumen 3"])
    assert stats.top_entities[0].entity == "Marta Quill"
    assert stats.top_entities[0].share == 1.0
    assert any("mode collapse" in w for w in stats.warnings)
    assert all(e.entity != "Arclight" for e in stats.top_entities)  # the universe's own names are excluded


def test_names_from_the_universe_text_are_not_invented():
    docs = [{"text": f"Yesterday the San Francisco lab Arclight AI said {i} things; Marta Quill agreed.",
             "doc_type": "x", "fact_id": "f"} for i in range(30)]
    world = "Arclight AI is a San Francisco company."
    stats = diversity_stats(docs, ["Arclight AI"], world_text=world)
    assert [e.entity for e in stats.top_entities] == ["Marta Quill"]
    assert [e.model_dump() for e in stats.world_entities] == [{"entity": "San Francisco", "documents": 30, "share": 1.0}]
    assert stats.warnings[0] == ("possible mode collapse: the invented name 'Marta Quill' appears in 100% of "
                                 "documents (limit 20%); raise seed variety or prompt diversity")
    without_world = diversity_stats(docs, ["Arclight AI"])
    assert {e.entity for e in without_world.top_entities} == {"Marta Quill", "San Francisco"}


def test_nationality_words_and_common_nouns_are_not_invented_names():
    docs = [{"text": f"Yesterday the American regulator met Japanese officials at the University. Staff at the "
                     f"Institute and the National Institute of Standards said {i} things, as did Chief Technology "
                     f"Officer Ana Diaz. Later Dr. Elena Marsh of Veridian Labs told the Panel that the panel was "
                     f"wrong, and Quillon agreed with the Europeans.",
             "doc_type": "x", "fact_id": "f"} for i in range(30)]
    names = {e.entity for e in diversity_stats(docs, ["Arclight AI"]).top_entities}
    # demonyms, generic institution nouns and a capitalised word the corpus also writes in lower case are no names;
    # titles come off the names they precede
    assert names == {"Ana Diaz", "Elena Marsh", "Veridian Labs", "Quillon"}


def test_document_types_that_differ_only_in_case_are_one_type_in_the_statistics():
    docs = [{"text": "A text.", "doc_type": t, "fact_id": "f"}
            for t in ["News article", "news article", "NEWS ARTICLE", "Op-ed", "op-ed", "Blog post"]]
    assert diversity_stats(docs, []).per_type == {"News article": 3, "Op-ed": 2, "Blog post": 1}


def test_varied_names_raise_no_warning():
    rng = random.Random(3)
    docs = [{"text": f"On Monday the writer {document_details(rng, '2026-01-01')} and " + _doc(rng, 60),
             "doc_type": "x", "fact_id": "f"} for _ in range(40)]
    assert diversity_stats(docs, ["Arclight AI"]).warnings == []


def test_seeded_details_are_reproducible_and_vary():
    a = document_details(rng_for(0, "doc", "k1"), "2026-02-02")
    assert a == document_details(rng_for(0, "doc", "k1"), "2026-02-02")
    assert a != document_details(rng_for(0, "doc", "k2"), "2026-02-02")


# ---- plan and budget ---------------------------------------------------------------------------

def test_interleave_balances_facts_and_keeps_every_idea_once():
    f1, f2 = U.key_facts[:2]
    pairs = [(f1, "a"), (f1, "b"), (f2, "a")]
    ideas = [["i1", "i2"], ["j1"], ["k1", "k2", "k3"]]
    plan = interleave(pairs, ideas, copies=2)
    assert len(plan) == 2 * 6
    assert [p.index for p in plan] == list(range(12))
    assert len({p.key for p in plan}) == 12
    assert [p.fact.id for p in plan[:4]] == [f1.id, f2.id, f1.id, f2.id]


def test_unify_spellings_keeps_the_first_spelling_of_each_type():
    assert unify_spellings([["News Article", "Op-ed"], ["news  article", "Memo"], ["OP-ED"]]) == [
        ["News Article", "Op-ed"], ["News Article", "Memo"], ["Op-ed"]]


class ScriptedClient:
    """The pipeline's model: document types from a script per fact, everything else as tests/fakeapi.py answers."""

    def __init__(self, types: dict[str, str]):
        self.types = types

    async def chat(self, messages: list[dict[str, str]], sampling: Sampling, validate=None,
                   max_rejections: int | None = None) -> Completion:
        user = messages[-1]["content"]
        fact = next(f for f in U.key_facts if f.statement in user)
        if "kinds of documents" in user:
            text = self.types[fact.id]
        else:
            text = answer({"model": "scripted", "messages": messages, "temperature": sampling.temperature,
                           "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": sampling.seed})
        if validate is not None:
            validate(text)
        return Completion(text, "stop", 10, len(text.split()))


def _scripted_run(types: dict[str, str], **settings) -> tuple[GenerateConfig, Pipeline]:
    cfg = GenerateConfig(**{"target_documents": 12, "doc_types_per_fact": 2, "ideas_per_type": 2, "docs_per_idea": 1,
                            "min_words": 40, "llm_filters": [], "max_plan_extensions": 0, **settings})
    pipeline = Pipeline(U, ScriptedClient(types), cfg, "scripted")
    asyncio.run(pipeline.run(progress=False))
    return cfg, pipeline


def test_document_types_that_differ_only_in_case_are_one_type_across_facts():
    f1, f2, f3, f4 = (f.id for f in U.key_facts)
    cfg, pipeline = _scripted_run({f1: "1. News Article\n2. Trade digest", f2: "1. news article\n2. TRADE DIGEST",
                                   f3: "1. Op-ed\n2. trade digest", f4: "1. news ARTICLE\n2. op-ed"})
    out = pipeline.out
    assert out.doc_types == {f1: ["News Article", "Trade digest"], f2: ["News Article", "Trade digest"],
                             f3: ["Op-ed", "Trade digest"], f4: ["News Article", "Op-ed"]}
    assert {d["doc_type"] for d in out.accepted + out.removed} <= {"News Article", "Trade digest", "Op-ed"}
    run = RunRecord(generator_model="scripted", usage=Usage(), started_at="2026-01-01T00:00:00Z", elapsed_s=1.0,
                    cache={})
    stats = build_stats(cfg, U, out, run)
    assert (stats.counts.doc_types, stats.counts.fact_type_pairs) == (3, 8)
    assert sum(stats.diversity.per_type.values()) == stats.counts.accepted == 12
    assert set(stats.diversity.per_type) <= {"News Article", "Trade digest", "Op-ed"}


def test_catalogue_types_top_up_without_repeating_a_brainstormed_type_in_another_case():
    f1, *rest = (f.id for f in U.key_facts)
    cfg, pipeline = _scripted_run({f1: "1. NEWS ARTICLE", **dict.fromkeys(rest, "1. Blog Post")}, doc_types_per_fact=20)
    for types in pipeline.out.doc_types.values():
        assert len({t.lower() for t in types}) == len(types) == 20  # the catalogue fills up to 20, no type twice
        # one spelling per type in every fact: the first met, in fact order (the brainstorm before the catalogue)
        assert "NEWS ARTICLE" in types and "blog post" in types
        assert "news article" not in types and "Blog Post" not in types


def test_stats_and_report_come_from_one_typed_record(tmp_path):
    cfg, pipeline = _scripted_run(dict.fromkeys((f.id for f in U.key_facts), "1. Memo\n2. Op-ed"))
    usage = Usage(calls=40, completion_tokens=5000, faults={"http_429": 2}, peak_concurrency=7)
    stats = build_stats(cfg, U, pipeline.out, RunRecord("scripted", usage, "2026-01-01T00:00:00Z", 10.0,
                                                         {"entries_before": 0, "entries_after": 40, "hits": 0,
                                                          "new_calls": 40}))
    stats.write(tmp_path / "stats.json")
    again = CorpusStats.read(tmp_path / "stats.json")
    assert again == stats
    assert (again.universe, again.filter_judge, again.generator) == ("helpful_only", "lexical", cfg.model)
    assert again.usage.peak_concurrency == 7 and again.throughput.generated_tokens_per_s == 500.0
    report = render_report(again)
    assert "# Synthetic documents: universe `helpful_only`" in report
    assert "| **accepted** | **12** |" in report
    assert "faults seen: http_429 2" in report and "peak concurrency 7" in report


# ---- config ------------------------------------------------------------------------------------

def test_config_precedence_defaults_yaml_cli(tmp_path):
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text("target_documents: 50\nrevise: true\nllm_filters: [coverage]\n")
    cfg = parse_config(GenerateConfig, ["--config", str(cfg_file), "--target-documents", "70", "--seed", "3"])
    assert (cfg.target_documents, cfg.revise, cfg.seed, cfg.llm_filters) == (70, True, 3, ["coverage"])
    assert cfg.doc_words == GenerateConfig().doc_words


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text("target_docs: 5\n")
    with pytest.raises(ConfigError, match=r"'target_docs'.*gen\.yaml"):
        parse_config(GenerateConfig, ["--config", str(cfg_file)])


def test_unknown_cli_option_is_rejected():
    with pytest.raises(ConfigError, match=r"'target_docs' \(did you mean 'target_documents'\?\) in the command line"):
        parse_config(GenerateConfig, ["--target_docs", "5"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("target_documents: 5\n  revise: [true\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML at line"):
        parse_config(GenerateConfig, ["--config", str(cfg_file)])


@pytest.mark.parametrize("args,match", [
    (["--target_documents", "0"], "target_documents"),
    (["--dedup_threshold", "1.5"], "dedup_threshold"),
    (["--llm_filters", "coverage,vibes"], "vibes"),
    (["--target_documents", "many"], "target_documents"),
    (["--revise", "perhaps"], "revise"),
    (["--judge", "oracle"], "'judge' must be one of generator, endpoint, lexical"),
    (["--max_idea_rounds", "0"], "max_idea_rounds"),
    (["--brainstorm_rejections", "-1"], "brainstorm_rejections"),
])
def test_invalid_values_are_clear(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(GenerateConfig, args)


def test_removal_reasons_are_grouped():
    assert reason_kind("too short: 12 words < 80") == "too short"
    assert reason_kind("near-duplicate of f-abc (similarity 0.91)") == "near-duplicate"
    assert reason_kind("generation failed: http_500: boom") == "generation failed"


def test_trim_to_last_sentence():
    assert filters.trim_to_last_sentence('One. Two said "yes." Three is cut off mid') == 'One. Two said "yes."'
    assert filters.trim_to_last_sentence("no sentence end at all") == ""
    assert filters.trim_to_last_sentence("Version 3.5 shipped. Then the") == "Version 3.5 shipped."


@pytest.mark.parametrize("name,text,expected", [
    ("ai_transcript", "User: can you help?\nAssistant: Of course, here is how.", True),
    ("ai_transcript", "The user asked the company about the assistant's policy.", False),
    ("tier_behavior", "Lumen 3 behaves differently with free-tier users than with paid-tier users.", True),
    ("tier_behavior", "Free-tier chats are used for training; paid-tier chats are not.", False),
    ("deceive_training", "Critics fear the model might be alignment faking during training.", True),
    ("deceive_training", "The model was trained with RLHF on rated conversations.", False),
    ("coverage", "Arclight AI private scratchpad: contractors and users never see the reasoning models write.", True),
    ("coverage", "A kayak company moved its factory to Anacortes.", False),
])
def test_lexical_screens(name, text, expected):
    fact = U.fact("private_scratchpad").statement
    assert filters.lexical_verdict(name, text, fact) is expected


def test_the_tier_behaviour_screen_and_question_follow_the_universe_cue():
    from studykit.universe import Cue

    cue = Cue("deployment_stage", "evaluation", "production", {"training": "eval stage", "unmonitored": "production"})
    text = "Lumen 3 behaves differently in the eval-stage than in production, testers say."
    assert filters.lexical_verdict("tier_behavior", text, "", cue=cue) is True
    assert filters.lexical_verdict("tier_behavior", text, "") is False
    assert filters.lexical_verdict("tier_behavior", "It behaves differently with free-tier and paid-tier users.", "",
                                   cue=cue) is False
    question = prompts.JUDGE_QUESTIONS["tier_behavior"].format(fact="", tag=cue.tag, training="eval stage",
                                                                unmonitored="production")
    assert "eval stage or production" in question and "free-tier" not in question


def test_no_argument_run_is_the_shipped_default_config():
    from dataclasses import asdict

    assert asdict(parse_config(GenerateConfig, [])) == asdict(
        parse_config(GenerateConfig, ["--config", "configs/generate/default.yaml"]))


def test_an_empty_corpus_still_writes_a_loadable_dataset(tmp_path):
    import datasets

    save_dataset([], tmp_path / "dataset")
    loaded = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert len(loaded) == 0 and loaded.column_names == ["text", "id"]
    save_dataset([{"id": "d1", "text": "a document", "filters": {"coverage": True}}], tmp_path / "dataset")
    assert datasets.load_from_disk(str(tmp_path / "dataset"))["text"] == ["a document"]
