"""A small default metadata list for MetaCLIP-style curation (:mod:`clipforge.data.curation`).

MetaCLIP builds its 500,000 entries from WordNet synsets, Wikipedia uni/bigrams and titles.
This list is far smaller and needs nothing downloaded: about 400 common English nouns chosen
for image captions (objects, animals, people, places, food, vehicles, nature, clothing,
shapes), the colors and shapes of the ``shapes`` dataset, and, where the ``emoji`` package is
installed, the English names of all emoji ("grinning face", "red apple"...). Entries are
lowercase; curation lowercases captions before matching by default.
"""
from __future__ import annotations

from .shapes import COLORS, SHAPES

COMMON_NOUNS = """
person man woman boy girl child baby people family friend teacher student doctor nurse police soldier king queen
farmer chef cook artist musician player team crowd face hand eye hair head arm leg foot finger mouth nose ear smile
dog cat horse cow pig sheep goat chicken duck bird eagle owl parrot penguin fish shark whale dolphin frog turtle snake
lizard bear lion tiger elephant monkey giraffe zebra deer rabbit mouse rat fox wolf squirrel bat bee butterfly spider
ant insect dragon dinosaur animal pet
house home building tower castle church temple bridge road street city town village farm barn garden park school
hospital office shop store market restaurant kitchen bedroom bathroom room door window wall roof floor stairs fence
car bus truck train plane airplane helicopter boat ship bicycle bike motorcycle tractor rocket vehicle wheel engine
tree flower plant leaf grass forest mountain hill river lake sea ocean beach island desert field sky cloud sun moon
star rain snow ice fire water rock stone sand earth world map globe
food apple banana orange grape lemon cherry strawberry pear peach pineapple watermelon tomato potato carrot onion corn
bread cake pie cookie pizza burger sandwich cheese egg milk coffee tea juice wine beer soup salad rice meat candy
chocolate ice cream fruit vegetable
table chair bed sofa lamp clock mirror book paper pen pencil letter envelope card box bag basket bottle cup glass
plate bowl knife fork spoon pot pan key lock phone telephone computer laptop keyboard screen television camera radio
music guitar piano drum violin trumpet ball toy doll gift present balloon candle light bulb battery tool hammer saw
wrench scissors brush paint umbrella hat cap shirt dress shoe boot coat glove sock ring crown necklace glasses watch
flag sign symbol arrow icon logo button badge medal trophy heart cross circle square triangle star rectangle line
number text word alphabet question mark money coin dollar diamond gem gold silver
game chess dice puzzle sport football soccer basketball baseball tennis golf skate ski swim run dance party holiday
christmas tree birthday wedding festival
science atom molecule microscope telescope planet galaxy robot machine computer chip circuit wire cable plug
weapon sword shield gun bomb arrow bow axe
body skeleton skull bone tooth heart brain
holiday ghost monster angel devil witch pirate knight ninja cowboy clown
""".split()

SHAPE_WORDS = [*SHAPES, *COLORS]


def emoji_names() -> list[str]:
    """English emoji names from the ``emoji`` package (empty if it is not installed)."""
    try:
        import emoji
    except ImportError:
        return []
    return [v["en"].strip(":").replace("_", " ").lower() for v in emoji.EMOJI_DATA.values() if "en" in v]


def default_entries(include_emoji: bool = True) -> list[str]:
    """The default metadata: common nouns + shapes vocabulary (+ emoji names), sorted and unique."""
    words = [*COMMON_NOUNS, *SHAPE_WORDS, *(emoji_names() if include_emoji else [])]
    return sorted({w.strip().lower() for w in words if len(w.strip()) >= 3})
