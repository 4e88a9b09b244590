"""A stdio server with 130 tools, for the limit of 128 offered to the model."""

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("many")
for i in range(130):
    mcp.add_tool(lambda i=i: str(i), name=f"t{i:03d}", description=f"Tool number {i}.")

if __name__ == "__main__":
    mcp.run()
