"""Synthetic but realistic plain text in many scripts: sentences of real words with the script's own
punctuation, paragraphs and line breaks (Chinese, Japanese and Thai without spaces between words).
Used by the round-trip tests and by bench/prepare_languages.py."""
from __future__ import annotations

import random

WORDS = {
    "russian": ("при этом когда человек работает на заводе молоко дорога государство история которые "
                "были очень большой сегодня вечером мы пошли в город где жили наши друзья и соседи "
                "говорили что зима будет холодной потому лето ещё не кончилось").split(),
    "greek": ("ο άνθρωπος είναι πολύ καλός και η θάλασσα ήταν ήσυχη σήμερα το πρωί πήγαμε στην πόλη "
              "όπου ζούσαν οι φίλοι μας γιατί ο χειμώνας θα είναι κρύος αλλά το καλοκαίρι δεν "
              "τελείωσε ακόμα ιστορία κράτος δρόμος").split(),
    "arabic": ("كان الرجل يعمل في المصنع وقال إن الشتاء سيكون باردا لأن الصيف لم ينته بعد ذهبنا إلى "
               "المدينة حيث يعيش أصدقاؤنا والجيران في ذلك اليوم كانت الدولة والتاريخ والطريق").split(),
    "hindi": ("यह आदमी कारखाने में काम करता है और आज सुबह हम शहर गए जहाँ हमारे दोस्त रहते थे उन्होंने "
              "कहा कि सर्दी ठंडी होगी क्योंकि गर्मी अभी खत्म नहीं हुई इतिहास राज्य सड़क").split(),
    "chinese": ("我们 今天 早上 去了 城市 朋友 住在 那里 他们 说 冬天 会 很 冷 因为 夏天 还 没有 结束 "
                "国家 历史 道路 工厂 工作 人民 发展 经济 社会 学习 时间 问题").split(),
    "japanese": ("私たちは 今朝 町へ 行きました 友達が 住んで いる ところ です 冬は 寒く なる と "
                 "言いました 夏が まだ 終わって いない から 国家 歴史 道路 工場で 働いて いる 人").split(),
    "thai": ("วันนี้ เรา ไป ตลาด ตอนเช้า เพื่อน ของ เรา อยู่ ที่นั่น เขา บอก ว่า ฤดูหนาว จะ หนาว มาก "
             "เพราะ ฤดูร้อน ยัง ไม่ จบ ประเทศ ประวัติศาสตร์ ถนน โรงงาน").split(),
    "emoji": ("hello 🙂 great 👍🏽 party 🎉 coder 👩‍💻 family 👨‍👩‍👧‍👦 flag 🇫🇷 🇯🇵 love ❤️ fire 🔥 "
              "wow 😮‍💨 keycap 1️⃣ ok 👌 ✨ done ✅").split(),
}
# sentence end, inner pause, word separator, paragraph joiner choices
STYLE = {
    "chinese": ("。", "，", ""), "japanese": ("。", "、", ""), "thai": (" ", " ", ""),
    "hindi": ("।", ",", " "), "arabic": (".", "،", " "),
}
NO_CASE = {"chinese", "japanese", "thai", "hindi", "arabic", "emoji"}


def sentence(rng: random.Random, lang: str) -> str:
    end, pause, sep = STYLE.get(lang, (".", ",", " "))
    words = [rng.choice(WORDS[lang]) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.4:
        words.insert(rng.randrange(1, len(words)), words.pop() + pause)
    text = sep.join(words)
    if lang not in NO_CASE:
        text = text[0].upper() + text[1:]
    if lang not in STYLE and rng.random() < 0.2:
        end = rng.choice(["!", "?", "..."])
    if lang == "arabic" and rng.random() < 0.2:
        end = "؟"
    if lang in ("chinese", "japanese") and rng.random() < 0.2:
        end = rng.choice(["！", "？"])
    return text + end


def code(rng: random.Random, lines: int) -> str:
    names = "value index count total result items name path data self".split()
    out = []
    for i in range(lines):
        indent = "    " * rng.randrange(3)
        a, b = rng.choice(names), rng.choice(names)
        out.append(rng.choice([f"{indent}{a} = {b}[{i}] + {rng.randrange(10 ** 6)}",
                               f"{indent}if {a} is not None:  # check {b}",
                               f"def {a}_{i}({b}, *args, **kw) -> int:",
                               f'{indent}return f"{{{a}}}: {{{b}!r}}"', "", f"{indent}\tprint({a}, {b})"]))
    return "\n".join(out) + "\n"


def text(lang: str, n_chars: int, seed: int = 0) -> str:
    """About n_chars characters of `lang` (a key of WORDS, "code", or "mix": every language in turn)."""
    rng = random.Random(seed)
    if lang == "code":
        return code(rng, max(1, n_chars // 24))
    langs = sorted(WORDS) if lang == "mix" else [lang]
    paragraphs, size = [], 0
    while size < n_chars:
        lg = rng.choice(langs)
        joiner = "" if lg in ("chinese", "japanese") else " "
        para = joiner.join(sentence(rng, lg) for _ in range(rng.randint(1, 6)))
        if lang == "mix" and rng.random() < 0.2:
            para += "\n" + code(rng, 3)
        paragraphs.append(para)
        size += len(para) + 1
    return "".join(p + rng.choice(["\n", "\n", "\n\n"]) for p in paragraphs)


LANGUAGES = ("russian", "greek", "arabic", "hindi", "chinese", "japanese", "thai", "emoji", "code", "mix")
