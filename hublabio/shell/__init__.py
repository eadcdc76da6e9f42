"""`hublab`, the shell: `main` (CLI: REPL, -c, piped stdin, --serial), `commands` (the command
table and the `@command` decorator add-ons use), `render` (results -> text), `repl`
(prompt-toolkit), `completer`, `serial_console`."""
