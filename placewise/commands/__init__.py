"""What each `placewise` subcommand does once `placewise.cli` has parsed its flags: one module per
family of commands. Torch is imported inside the commands, so parsing stays fast."""
