"""The README's `register_attention` example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_register_attention_snippet_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = [b for b in blocks if "keras_sara.register_attention(MyAttention" in b]
    assert len(snippet) == 1
    namespace = {}
    exec(compile(snippet[0], "README.md", "exec"), namespace)
    assert namespace["report"].num_converted == 1
    assert capsys.readouterr().out.strip().endswith("SARAMyAttention")
