"""Prompt templates used by TaskRes/CoOp-style zero-shot classifiers."""

#: the ImageNet ensemble: CoOp's 7 selected templates plus the plain one (8 templates, docs/methods.md §1)
IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
]

#: one template per dataset (CoOp's CUSTOM_TEMPLATES); anything else uses "a photo of a {}."
DATASET_TEMPLATES = {
    "OxfordPets": ["a photo of a {}, a type of pet."],
    "OxfordFlowers": ["a photo of a {}, a type of flower."],
    "FGVCAircraft": ["a photo of a {}, a type of aircraft."],
    "DescribableTextures": ["{} texture."],
    "EuroSAT": ["a centered satellite photo of {}."],
    "StanfordCars": ["a photo of a {}."],
    "Food101": ["a photo of {}, a type of food."],
    "SUN397": ["a photo of a {}."],
    "Caltech101": ["a photo of a {}."],
    "UCF101": ["a photo of a person doing {}."],
    "ImageNet": IMAGENET_TEMPLATES,
}

DEFAULT_TEMPLATES = ["a photo of a {}."]


def nearest(name: str, known) -> str | None:
    """The entry of ``known`` closest to ``name``: an exact match ignoring case, '-' and '_' first, else the
    closest spelling (difflib), else None."""
    import difflib

    def fold(s):
        return s.lower().replace("-", "").replace("_", "")

    known = list(known)
    same = [k for k in known if fold(k) == fold(name)]
    if same:
        return same[0]
    close = difflib.get_close_matches(fold(name), [fold(k) for k in known], n=1, cutoff=0.6)
    return next(k for k in known if fold(k) == close[0]) if close else None


def check_dataset(dataset: str | None) -> None:
    """Refuse a dataset name with no templates, naming the known ones and the nearest."""
    if dataset is None or dataset in DATASET_TEMPLATES:
        return
    guess = nearest(dataset, DATASET_TEMPLATES)
    hint = f"did you mean {guess!r}? " if guess else ""
    raise ValueError(f"unknown dataset {dataset!r}: {hint}known names (case matters): "
                     f"{', '.join(sorted(DATASET_TEMPLATES))}; leave it out for the generic template "
                     f"{DEFAULT_TEMPLATES[0]!r}")


def templates_for(dataset: str | None) -> list[str]:
    """The templates of a known dataset name, the generic one for None; an unknown name is refused."""
    check_dataset(dataset)
    if dataset is None:
        return DEFAULT_TEMPLATES
    return DATASET_TEMPLATES[dataset]
