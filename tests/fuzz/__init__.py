"""The fuzz harness (`datagrams`), its atheris driver (`run`) and its seeds (`seeds`)."""
