"""demo/report.py: the HTML report's accuracy table."""

from __future__ import annotations

from demo.report import _markdown_table_to_html


def test_report_html_table_is_the_top1_table_of_eval_md():
    md = ("### top-1\n\n| set | a |\n|---|---|\n| LGM | 71.0 |\n\n### top-5\n\n| set | a |\n|---|---|\n"
          "| LGM | 99.0 |\n")
    table = _markdown_table_to_html(md)
    assert "71.0" in table and "99.0" not in table and table.count("<th>") == 2
