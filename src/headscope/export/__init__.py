"""Export headscope's results in other tools' layouts (files only; nothing is uploaded)."""
