"""The smoke-config artifacts of the stage tests (`upstream`, `teachers`) and the production chain
(`production`) are session fixtures in tests/conftest.py: tests/models uses them too, and a fixture
imported into a second module would be a second fixture, built a second time."""
