"""What an export found and left out: names and categories with their pixel shares, skipped images, dropped regions.

Memory is bounded by the number of distinct names, not of images (skipped images beyond the first
:data:`MAX_LISTED` are counted, not listed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

MAX_LISTED = 100


class ExportSummary:
    """Accumulates an export's figures image by image; :meth:`to_dict` and :meth:`text` report them."""

    def __init__(self, pred_dir: str, dest: str, fmt: str, classes: Sequence[str] | None, mapper: str | None):
        self.head = {"predictions": pred_dir, "export": dest, "format": fmt, "mapper": mapper if classes else None}
        self.n_images = 0
        self.n_pixels = 0
        self.unlabelled_pixels = 0
        self.name_pixels: Counter[str] = Counter()
        self.name_to_category: dict[str, str | None] = {}
        self.category_pixels: Counter[str] = Counter()
        self.category_images: Counter[str] = Counter()
        self.regions_dropped = 0
        self.skipped: list[dict] = []
        self.n_skipped = 0

    def add_image(
        self,
        label_map: np.ndarray,
        vocabulary: Sequence[str],
        categories: np.ndarray,
        category_names: Sequence[str],
        regions_dropped: int,
    ) -> None:
        """Count one exported image: its names' pixels (``label_map``) and its categories' pixels (``categories``)."""
        self.n_images += 1
        self.n_pixels += label_map.size
        self.regions_dropped += regions_dropped
        names = np.bincount(label_map.ravel(), minlength=len(vocabulary) + 1)
        for i, name in enumerate(vocabulary, start=1):
            if names[i]:
                self.name_pixels[name] += int(names[i])
        cats = np.bincount(categories.ravel(), minlength=len(category_names) + 1)
        self.unlabelled_pixels += int(cats[0])
        for cid in np.flatnonzero(cats[1:]) + 1:
            self.category_pixels[category_names[cid - 1]] += int(cats[cid])
            self.category_images[category_names[cid - 1]] += 1

    def skip(self, stem: str, reason: str) -> None:
        self.n_skipped += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append({"name": stem, "reason": reason})

    def _share(self, pixels: int) -> float:
        return round(100.0 * pixels / self.n_pixels, 4) if self.n_pixels else 0.0

    def to_dict(self) -> dict:
        """The summary as JSON-ready data (shares in percent of all exported pixels)."""
        dropped = {n: p for n, p in self.name_pixels.items() if self.name_to_category.get(n, n) is None}
        return {
            **self.head,
            "images_exported": self.n_images,
            "images_skipped": self.n_skipped,
            "skipped": self.skipped,
            "categories": {
                c: {"pixel_share": self._share(p), "images": self.category_images[c]}
                for c, p in self.category_pixels.most_common()
            },
            "unlabelled_share": self._share(self.unlabelled_pixels),
            "names": {
                n: {"pixel_share": self._share(p), "category": self.name_to_category.get(n, n)}
                for n, p in self.name_pixels.most_common()
            },
            "names_dropped": sorted(dropped),
            "dropped_share": self._share(sum(dropped.values())),
            "regions_dropped_min_area": self.regions_dropped,
        }

    def text(self, top: int = 15) -> str:
        """A few lines for the terminal."""
        d = self.to_dict()
        lines = [
            f"exported {d['images_exported']} images to {d['export']} ({d['format']}); skipped {d['images_skipped']}",
            f"{len(d['categories'])} categories from {len(d['names'])} names; unlabelled {d['unlabelled_share']:.2f}% "
            f"of pixels, names without a class {d['dropped_share']:.2f}% ({len(d['names_dropped'])} names), "
            f"{d['regions_dropped_min_area']} regions under --min-area",
        ]
        for c, v in list(d["categories"].items())[:top]:
            lines.append(f"  {c:<24} {v['pixel_share']:6.2f}% of pixels, in {v['images']} images")
        if len(d["categories"]) > top:
            lines.append(f"  ... and {len(d['categories']) - top} more (summary.json)")
        for s in d["skipped"][:5]:
            lines.append(f"  skipped {s['reason']}")
        return "\n".join(lines)
