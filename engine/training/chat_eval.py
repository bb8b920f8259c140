"""`famserve eval chat`: a fixed, committed set of short chat prompts with checkable answers, answered greedily
through the model's chat template by the streaming engine, for any model, mode and adapter. The bar for a FAM adapter
is that it passes no fewer of them than BSWA does (issue #8, "chat answers as good as BSWA's").

Three sets, reported apart:

- **short**: a question alone (facts, small arithmetic, a sentence to repeat, "reply with just the number"). It fits
  in one block, so it checks that the adapter's LoRA and FAM prompt left the base model's answers intact.
- **document**: the short set's questions asked in a second turn, after a first user message of about
  `document_tokens` tokens of unrelated prose (DOCUMENT below) and a short assistant reply: answering must survive
  reading a long text through the memory.
- **recall** (long-context chat): one user message that states a made-up fact at its START, then the long document,
  then asks for the fact at its end. With a window (M+1)L smaller than the document only FAM can carry it.

An answer passes when it contains one of the expected strings as whole words (case-insensitive; a number not inside
a longer one) and, where a case limits it, has at most `max_words` words. SmolLM2-135M-Instruct's scores are in
docs/training.md."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from famserve.engine.model import FamModel
from famserve.engine.runner import ModelRunner
from famserve.engine.tokenizer import Tokenizer

SETS = ("short", "document", "recall")


@dataclass(frozen=True)
class ChatCase:
    id: str
    question: str  # the user's question (its last message)
    expect: tuple[str, ...]  # the answer must contain one of these, as whole words, ignoring case
    max_words: int | None = None  # instruction following: the answer has at most this many words
    fact: str | None = None  # recall cases: stated at the start of the long user message
    answer_prefix: str = ""  # the start of the assistant's answer, put after the chat template's generation prompt


# Kept from a larger list because SmolLM2-135M-Instruct answers them right in bswa mode (see docs/training.md).
SHORT_CASES: tuple[ChatCase, ...] = (
    ChatCase("capital-france", "What is the capital of France?", ("Paris",)),
    ChatCase("capital-japan", "What is the capital of Japan?", ("Tokyo",)),
    ChatCase("capital-germany", "What is the capital of Germany?", ("Berlin",)),
    ChatCase("capital-uk", "What is the capital of the United Kingdom?", ("London",)),
    ChatCase("capital-egypt", "What is the capital of Egypt?", ("Cairo",)),
    ChatCase("add-2-2", "What is 2 + 2?", ("4", "four")),
    ChatCase("times-3-3", "What is 3 times 3?", ("9", "nine")),
    ChatCase("days-week", "How many days are in a week?", ("7", "seven")),
    ChatCase("dog-legs", "How many legs does a dog have?", ("4", "four")),
    ChatCase("hand-fingers", "How many fingers are on one hand?", ("5", "five")),
    ChatCase("triangle-sides", "How many sides does a triangle have?", ("3", "three")),
    ChatCase("sky-colour", "What color is the sky on a clear day?", ("blue",)),
    ChatCase("water-formula", "What is the chemical formula of water?", ("H2O", "H₂O")),
    ChatCase("romeo-author", "Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ChatCase("boiling-point", "At what temperature in degrees Celsius does water boil?", ("100",)),
    ChatCase("opposite-hot", "What is the opposite of hot?", ("cold",)),
    ChatCase("brazil-language", "What language is spoken in Brazil?", ("Portuguese",)),
    ChatCase("plants-gas", "Which gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ChatCase("mona-lisa", "Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ChatCase("tallest-mountain", "What is the tallest mountain in the world?", ("Everest",)),
    ChatCase("japan-currency", "What is the currency of Japan?", ("yen",)),
    ChatCase("largest-ocean", "What is the largest ocean on Earth?", ("Pacific",)),
    ChatCase("gold-symbol", "What is the chemical symbol for gold?", ("Au",)),
    ChatCase("red-planet", "Which planet is known as the Red Planet?", ("Mars",)),
    ChatCase("pumps-blood", "Which organ pumps blood through the body?", ("heart",)),
    ChatCase("plural-mouse", "What is the plural of the word \"mouse\"?", ("mice",)),
    ChatCase("hello-spanish", "Translate the word \"hello\" into Spanish.", ("hola",)),
    ChatCase("repeat-fox", "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.",
             ("The quick brown fox jumps over the lazy dog",)),
    ChatCase("bicycle-number", "How many wheels does a bicycle have? Reply with just the number.", ("2", "two"),
             max_words=5),
    ChatCase("city-in-prompt", "Hi, I am Tom and I live in Madrid. In which city do I live?", ("Madrid",)),
)

# Made-up facts (no model knows them) for the recall set; none of the answers occurs in DOCUMENT. The assistant's
# answer is begun for it (answer_prefix), as the PassKey prompt does, so that a small model answers the question
# rather than continuing the text.
RECALL_CASES: tuple[ChatCase, ...] = (
    ChatCase("recall-cat", "What is my cat's name?", ("Biscuit",), fact="My cat's name is Biscuit.",
             answer_prefix="Your cat's name is"),
    ChatCase("recall-colour", "What is my favorite color?", ("purple",), fact="My favorite color is purple.",
             answer_prefix="Your favorite color is"),
    ChatCase("recall-city", "In which city was I born?", ("Lisbon",), fact="I was born in the city of Lisbon.",
             answer_prefix="You were born in"),
    ChatCase("recall-day", "On which day is the meeting?", ("Thursday",), fact="The meeting is on Thursday.",
             answer_prefix="The meeting is on"),
    ChatCase("recall-brother", "What is my brother's name?", ("Oliver",), fact="My brother's name is Oliver.",
             answer_prefix="Your brother's name is"),
    ChatCase("recall-number", "What is the secret number?", ("4812",), fact="The secret number is 4812.",
             answer_prefix="The secret number is"),
    ChatCase("recall-fruit", "Which fruit do I like most?", ("mango", "mangoes"),
             fact="The fruit I like most is the mango.", answer_prefix="The fruit you like most is the"),
    ChatCase("recall-dog", "What is my dog's name?", ("Pepper",), fact="My dog's name is Pepper.",
             answer_prefix="Your dog's name is"),
    ChatCase("recall-sister", "Where does my sister live?", ("Vienna",), fact="My sister lives in Vienna.",
             answer_prefix="Your sister lives in"),
    ChatCase("recall-password", "What is the password?", ("sunflower",), fact="The password is sunflower.",
             answer_prefix="The password is"),
    ChatCase("recall-teacher", "What is my teacher's name?", ("Henderson",),
             fact="My teacher's name is Mrs Henderson.", answer_prefix="Your teacher's name is"),
    ChatCase("recall-keys", "Where do I keep my keys?", ("kitchen drawer", "kitchen"),
             fact="I keep my keys in the kitchen drawer.", answer_prefix="You keep your keys in the"),
)

# Unrelated prose, written for this evaluation (not from any book): the long first message of the document and
# recall sets, repeated paragraph by paragraph up to the requested length.
DOCUMENT: tuple[str, ...] = (
    "The village of Harrowmere sits where a slow river meets a wide grey estuary. For most of the year the tide "
    "decides everything there: when the boats leave, when the mud flats open for the cockle pickers, and when the "
    "children may cross the causeway to the little school on the island. Visitors often say the place feels "
    "unhurried, but the people who live there would tell you that they are simply patient, because the water has "
    "never once waited for anybody.",
    "At the northern end of the harbour stands a stone warehouse that used to store salt. Its walls are nearly a "
    "metre thick, and in summer it stays cool enough that the baker keeps his flour there. In winter the building "
    "becomes a meeting hall. Long tables are carried in, lamps are hung from the beams, and on Saturday evenings "
    "the whole village gathers to share soup, argue about the weather and listen to whoever has a story to tell.",
    "The oldest fisherman in Harrowmere is a quiet man named Edwin Marsh. He has worked the estuary for more than "
    "fifty years and claims he can smell a storm a day before it arrives. Younger sailors laugh at this, yet they "
    "still glance at him before they untie their boats. When Edwin leaves his nets folded on the quay and goes "
    "home early, most of the harbour follows his example without a word.",
    "Every spring the village holds a race across the flats at low tide. The runners carry wooden buckets, and the "
    "winner is not the fastest but the one who arrives at the far post with the most water still in the bucket. "
    "The rules have not changed in living memory. A schoolteacher once proposed a prize for speed as well, and the "
    "idea was discussed for three long evenings before it was politely forgotten.",
    "Along the sea wall there is a row of narrow houses painted in pale colours: cream, sand, soft grey and the "
    "faded green of old copper. Each house has a bench by its door, and in the late afternoon the benches fill "
    "with neighbours who watch the light change over the water. Conversations there are slow and wander freely "
    "from the price of rope to the habits of gulls, and nobody is ever in a hurry to finish them.",
    "The ferry that links the village to the town across the estuary is a flat wooden boat pulled along a steel "
    "cable. It can carry two carts, a dozen passengers and, on market days, an astonishing number of baskets. The "
    "ferryman keeps a chalkboard by the landing where he writes the times of the crossings, along with a short "
    "remark about the day, such as 'wind from the west' or 'herons fishing near the pier'.",
    "In the hills behind Harrowmere there are orchards of small hard apples that are good for nothing until they "
    "have been stored through the winter. By February they turn sweet, and the village makes a dark cider that it "
    "drinks at the first warm festival of the year. The orchards are shared: each family looks after a few rows, "
    "and the harvest is divided according to an old ledger kept in the warehouse office.",
    "When fog rolls in from the sea, the harbour bell is rung every few minutes so that boats still out on the "
    "water can find their way home. The bell is heavy and its rope is worn smooth, and the task of ringing it falls "
    "to whoever happens to be nearest. On the foggiest nights several people take turns, sitting together on the "
    "steps with blankets and flasks of tea, listening for the answering horns of the boats.",
    "The island school has only one classroom, with tall windows that face the open sea. Lessons stop whenever a "
    "seal is spotted on the sandbank, because experience has shown that nothing else will be learned until the "
    "children have watched it for a while. The teacher keeps a notebook of every sighting, with the date, the tide "
    "and the weather, and the pupils are proud that their records now fill nine thick volumes.",
    "Late in the year the estuary fills with birds that have travelled from the far north. They arrive in long "
    "wavering lines and settle on the mud in their thousands, feeding through the short grey days. People in "
    "Harrowmere walk out along the sea wall just to hear them, a vast murmuring sound that rises and falls with "
    "the wind, and they say the winter has truly begun only when the geese have come.",
)
DOCUMENT_INTRO = "Here is a text about a village. Read it carefully.\n\n"
DOCUMENT_REPLY = "I have read the text."
RECALL_INTRO = "Keep this in mind while you read the text below."
RECALL_QUESTION = "Now a question about what I told you before the text: "


@dataclass
class ChatAnswer:
    case: ChatCase
    set: str
    messages: list[dict[str, str]]
    prompt_tokens: int
    answer: str
    passed: bool
    reason: str


@dataclass
class ChatEvalResult:
    mode: str  # FamConfig.describe() of the model evaluated
    set: str
    answers: list[ChatAnswer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.answers)

    @property
    def passed(self) -> int:
        return sum(a.passed for a in self.answers)


def count_words(text: str) -> int:
    return len(re.findall(r"\w+(?:['’.]\w+)*", text))


def _pattern(expected: str) -> str:
    """Whole words; a number also must not be part of a longer number ("4" is not in "14", "4.5" or "-4")."""
    if re.fullmatch(r"\d+", expected):
        return rf"(?<![\w.,\-−]){expected}(?!\w|[.,]\d)"
    return rf"(?<!\w){re.escape(expected)}(?!\w)"


def judge(case: ChatCase, answer: str) -> tuple[bool, str]:
    """(passed, why): the answer contains one of case.expect as whole words (case-insensitive) and, when
    case.max_words is set, has at most that many words."""
    found = next((e for e in case.expect if re.search(_pattern(e), answer, flags=re.IGNORECASE)), None)
    if found is None:
        return False, f"none of {list(case.expect)}"
    words = count_words(answer)
    if case.max_words is not None and words > case.max_words:
        return False, f"contains {found!r} but has {words} words, more than {case.max_words}"
    return True, f"contains {found!r}"


def document_text(tokenizer: Tokenizer, document_tokens: int) -> str:
    """DOCUMENT's paragraphs, repeated in order, until they hold at least document_tokens tokens."""
    paragraphs: list[str] = []
    count = 0
    while count < document_tokens:
        paragraph = DOCUMENT[len(paragraphs) % len(DOCUMENT)]
        paragraphs.append(paragraph)
        count += len(tokenizer.encode(paragraph + "\n\n"))
    return "\n\n".join(paragraphs)


def case_messages(case: ChatCase, chat_set: str, document: str) -> list[dict[str, str]]:
    if chat_set == "short":
        return [{"role": "user", "content": case.question}]
    if chat_set == "document":
        return [{"role": "user", "content": DOCUMENT_INTRO + document},
                {"role": "assistant", "content": DOCUMENT_REPLY},
                {"role": "user", "content": case.question}]
    if chat_set == "recall":
        return [{"role": "user", "content": f"{case.fact} {RECALL_INTRO}\n\n{document}\n\n{RECALL_QUESTION}"
                                            f"{case.question}"}]
    raise ValueError(f"chat set: {chat_set!r} is not one of {', '.join(SETS)}")


def prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], case: ChatCase) -> list[int]:
    """The chat template with its generation prompt, then the case's answer prefix."""
    ids = tokenizer.apply_chat_template(messages)
    return ids + tokenizer.encode(case.answer_prefix) if case.answer_prefix else ids


def default_cases(chat_set: str) -> tuple[ChatCase, ...]:
    return RECALL_CASES if chat_set == "recall" else SHORT_CASES


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


@torch.no_grad()
def greedy_answers(model: FamModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int = 48, batch_size: int = 8, chunk_tokens: int = 512) -> list[str]:
    """Greedy continuation of each prompt (one engine stream each, `batch_size` prefilled and decoded together)
    until an end-of-sequence token or max_new_tokens, decoded without special tokens. The tokens all prompts start
    with (the chat template's header; the long first message of the document set) are read once, into a state each
    stream starts from a copy of."""
    runner = ModelRunner(model, max_step_tokens=chunk_tokens)
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    shared = shared_prefix_length(prompts)
    base = model.new_state()
    if shared:
        runner.run([base], [prompts[0][:shared]])
    answers: list[str] = []
    for first in range(0, len(prompts), batch_size):
        batch = [p[shared:] for p in prompts[first:first + batch_size]]
        states = [base.clone() for _ in batch]
        logits = torch.cat(runner.run(states, batch))  # (b, V)
        generated: list[list[int]] = [[] for _ in batch]
        live = list(range(len(batch)))
        for _ in range(max_new_tokens):
            still = []  # (stream, token) of the streams that go on
            for i, token in zip(live, logits.argmax(-1).tolist()):
                if token in eos:
                    continue
                generated[i].append(token)
                if len(generated[i]) < max_new_tokens:
                    still.append((i, token))
            if not still:
                break
            live = [i for i, _ in still]
            logits = runner.decode([states[i] for i in live], [t for _, t in still])
        answers += [tokenizer.decode(out, skip_special_tokens=True).strip() for out in generated]
    return answers


def chat_eval(model: FamModel, tokenizer: Tokenizer, sets: Iterable[str] = SETS, document_tokens: int = 2500,
              max_new_tokens: int = 48, batch_size: int = 8, chunk_tokens: int = 512,
              cases: dict[str, Sequence[ChatCase]] | None = None) -> list[ChatEvalResult]:
    """Every case of every set answered greedily by `model` and judged; `cases` replaces the default cases of a
    set (short and document share SHORT_CASES, recall has RECALL_CASES)."""
    document = document_text(tokenizer, document_tokens)
    results = []
    for chat_set in sets:
        chosen = (cases or {}).get(chat_set, default_cases(chat_set))
        started = time.perf_counter()
        messages = [case_messages(case, chat_set, document) for case in chosen]
        prompts = [prompt_ids(tokenizer, m, case) for m, case in zip(messages, chosen)]
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, chunk_tokens)
        result = ChatEvalResult(model.fam_config.describe(), chat_set)
        for case, m, prompt, answer in zip(chosen, messages, prompts, answers):
            passed, reason = judge(case, answer)
            result.answers.append(ChatAnswer(case, chat_set, m, len(prompt), answer, passed, reason))
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results
