"""The ServerApp: hetfed's heterogeneous strategy over the server's large model."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hetfed.flower import server_main

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
