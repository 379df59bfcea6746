"""Lesson 07, the capstone: stack the techniques on one model (its experiment), choose a variant for a budget from
every record present (:mod:`labkit.select`, shared with the report), and draw the trade-off (its figures)."""
