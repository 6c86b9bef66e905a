"""The photographs the tiny model is trained on, and the held-out ones that make the ``demo`` set.

Only images any user can install from the package registries are used (issue 3): scikit-image's
bundled photos, scikit-learn's ``load_sample_images`` (china, flower), matplotlib's
``grace_hopper.jpg``, and the photographs in the Debian packages ``mate-backgrounds`` and
``plasma-workspace-wallpapers`` (illustrations and renders skipped; licences from each package's
``debian/copyright``). The evaluation sets in ``../shared/data`` are never used for training.

The demo photos are disjoint from the training photos: :data:`DEMO_IDS` are excluded from
:func:`training_sources`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class PhotoSource:
    """One photograph: a stable id, where it comes from and under which licence."""

    id: str
    package: str  # "scikit-image", "scikit-learn", "matplotlib", "debian:mate-backgrounds", ...
    relpath: str  # path inside the package (python packages) or absolute path (Debian packages)
    licence: str
    credit: str

    def path(self) -> Path:
        if self.package.startswith("debian:"):
            return Path(self.relpath)
        module = {"scikit-image": "skimage", "scikit-learn": "sklearn", "matplotlib": "matplotlib"}[
            self.package
        ]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"python package {self.package} is not installed")
        return Path(spec.origin).parent / self.relpath

    def available(self) -> bool:
        try:
            return self.path().is_file()
        except FileNotFoundError:
            return False

    def load(self) -> Image.Image:
        return Image.open(self.path()).convert("RGB")


_SK = "scikit-image"
_MATE = "debian:mate-backgrounds"
_PLASMA = "debian:plasma-workspace-wallpapers"
_MATE_LIC = "GPL-2+ (debian/copyright of mate-backgrounds)"
_PLASMA_LIC = "GPL-2+ (debian/copyright of plasma-workspace-wallpapers)"


def _mate(name: str, credit: str) -> PhotoSource:
    return PhotoSource(
        f"mate-{name.lower()}",
        _MATE,
        f"/usr/share/backgrounds/mate/nature/{name}.jpg",
        _MATE_LIC,
        credit,
    )


def _plasma(name: str, size: str = "1920x1080") -> PhotoSource:
    return PhotoSource(
        f"plasma-{name.lower()}",
        _PLASMA,
        f"/usr/share/wallpapers/{name}/contents/images/{size}.jpg",
        _PLASMA_LIC,
        "KDE Plasma wallpaper authors (see the package's debian/copyright)",
    )


PHOTOS: tuple[PhotoSource, ...] = (
    PhotoSource(
        "skimage-astronaut", _SK, "data/astronaut.png", "public domain", "NASA (Eileen Collins)"
    ),
    PhotoSource("skimage-chelsea", _SK, "data/chelsea.png", "CC0", "Stefan van der Walt"),
    PhotoSource("skimage-coffee", _SK, "data/coffee.png", "CC0", "Rachel Michetti"),
    PhotoSource("skimage-rocket", _SK, "data/rocket.jpg", "public domain", "SpaceX"),
    PhotoSource(
        "skimage-motorcycle",
        _SK,
        "data/motorcycle_left.png",
        "see scikit-image data docs",
        "Middlebury stereo dataset (Scharstein et al.)",
    ),
    PhotoSource(
        "sklearn-china",
        "scikit-learn",
        "datasets/images/china.jpg",
        "CC-BY-2.0",
        "danielbuechele (Flickr)",
    ),
    PhotoSource(
        "sklearn-flower",
        "scikit-learn",
        "datasets/images/flower.jpg",
        "CC-BY-2.0",
        "vultilion (Flickr)",
    ),
    PhotoSource(
        "mpl-grace-hopper",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "public domain",
        "US Navy",
    ),
    _mate("Aqua", "Charles Barbin"),
    _mate("Blinds", "Lennart Poettering, Andrea Cimitan"),
    _mate("Dune", "Marco Cogoni, Hylke Bons"),
    _mate("FreshFlower", "Jens Ansorg"),
    _mate("Garden", "Charles Barbin"),
    _mate("GreenMeadow", "Timothy Schellhase, Lapo Calamandrei"),
    _mate("LadyBird", "Charles Barbin"),
    _mate("RainDrops", "blackcombwhistler07"),
    _mate("Storm", "Sergey Nazarov"),
    _mate("TwoWings", "Charles Barbin, Hylke Bons"),
    _mate("Wood", "Jean-François Fortin Tam"),
    _mate("YellowFlower", "Charles Barbin"),
    _plasma("BytheWater"),
    _plasma("ColdRipple"),
    _plasma("ColorfulCups", "2560x1600"),
    _plasma("DarkestHour"),
    _plasma("EveningGlow"),
    _plasma("FallenLeaf"),
    _plasma("Grey"),
    _plasma("Kite"),
    _plasma("OneStandsOut"),
    _plasma("Path"),
    _plasma("summer_1am"),
)

#: Held out from training; the ``demo`` dataset is cut from these.
DEMO_IDS: tuple[str, ...] = (
    "skimage-coffee",
    "skimage-chelsea",
    "mate-ladybird",
    "mate-storm",
    "plasma-eveningglow",
    "plasma-colorfulcups",
)


def photo(photo_id: str) -> PhotoSource:
    for source in PHOTOS:
        if source.id == photo_id:
            return source
    raise KeyError(photo_id)


def training_sources(require_debian: bool = False) -> list[PhotoSource]:
    """Available training photos (never the demo ones). Debian wallpapers are used when installed;
    ``require_debian`` makes their absence an error (the shipped weights were trained with them)."""
    sources = [s for s in PHOTOS if s.id not in DEMO_IDS]
    missing = [s for s in sources if not s.available()]
    if require_debian and missing:
        names = ", ".join(s.id for s in missing)
        raise FileNotFoundError(
            f"training photos missing: {names}. Install them with "
            "`apt-get install mate-backgrounds plasma-workspace-wallpapers`."
        )
    return [s for s in sources if s.available()]
