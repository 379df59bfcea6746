"""What every ipywidgets explorer shares. Each technique's explorer lives in its folder's ``figures`` module
(``labkit.quant.figures.QuantExplorer``, ``labkit.serve.figures.KVCacheViewer`` …): its state → figure logic is a
plain function tests drive without a browser, and the widget class only wires controls to it."""

from __future__ import annotations

from typing import Any


class Explorer:
    """What every explorer shares: shown in a notebook, it displays its controls and draws once; each watched
    control's change redraws. A subclass builds its controls, calls :meth:`layout` and :meth:`watch`, and
    implements ``update()``, which draws through :meth:`show` and returns the numbers it drew (tests read them)."""

    box: Any
    out: Any

    def layout(self, *rows: Any) -> None:
        """The explorer's box: ``rows`` of controls, then the output area it draws in."""
        import ipywidgets as W

        self.out = W.Output()
        self.box = W.VBox([*rows, self.out])

    def watch(self, *controls: Any, then: Any = None) -> None:
        """Call ``then`` (default: ``update``) whenever one of ``controls`` changes value."""
        for control in controls:
            control.observe(lambda _change: (then or self.update)(), names="value")

    def show(self, *items: Any) -> None:
        """Replace what the output area shows: figures are displayed, strings printed."""
        from IPython.display import display

        self.out.clear_output(wait=True)
        with self.out:
            for item in items:
                if isinstance(item, str):
                    print(item)
                else:
                    display(item)

    def update(self) -> dict[str, Any]:
        raise NotImplementedError

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
        self.update()
