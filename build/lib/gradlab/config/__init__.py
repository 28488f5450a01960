"""What configures a run: the rules every value is checked against (rules.py), the command-line front that turns
a bad override or value into one paragraph (cli.py), and the resolvers Hydra's configs use (resolvers.py)."""
