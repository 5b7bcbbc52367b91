"""The package's rooms keep to their jobs: Flask stays in the web room and the app's
factory, storage never reaches into the web room, and the app's objects are one typed
`Services`, not string keys."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sms_status"

# Where Flask may be imported: the web room, the app factory and its services, the metrics'
# request hooks, the commands, and the webhook receiver (a small Flask app of its own).
FLASK_ALLOWED = ("web/", "__init__.py", "services.py", "metrics.py", "commands.py",
                 "webhooks/receiver.py")


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def imported(path):
    """The modules `path` imports, at its top or inside its functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def name(path):
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", modules(), ids=name)
def test_flask_is_imported_only_by_the_web_room_and_the_app_factory(path):
    flask = {module for module in imported(path) if module.split(".")[0] == "flask"}
    if not name(path).startswith(FLASK_ALLOWED):
        assert not flask, f"{name(path)} imports {flask}: keep Flask in web/"


@pytest.mark.parametrize("path", [path for path in modules() if name(path).startswith(
    ("storage/", "webhooks/", "serving/"))], ids=name)
def test_the_other_rooms_import_nothing_of_the_web_room(path):
    web = {module for module in imported(path)
           if module == "sms_status.web" or module.startswith("sms_status.web.")}
    assert not web, f"{name(path)} imports {web}"


@pytest.mark.parametrize("path", modules(), ids=name)
def test_the_apps_objects_are_reached_through_services_not_string_keys(path):
    if name(path) != "services.py":
        assert "extensions[" not in path.read_text() and "extensions.get(" not in path.read_text()
