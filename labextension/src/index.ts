/**
 * anvil_nb's JupyterLab extension: the "Server Functions" panel in the left sidebar
 * (`src/panel/`), and the command that opens it ("Open Server Functions", in the palette).
 * The browser client (`src/client/`) is a separate bundle, `anvil_nb/static/client.js`, that the
 * panel loads from the host like any page would.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from "@jupyterlab/application";
import { ICommandPalette } from "@jupyterlab/apputils";
import { LabIcon } from "@jupyterlab/ui-components";
import { ServerFunctionsPanel } from "./panel/panel.js";

const OPEN = "anvil-nb:open";

/** A plug with a lightning bolt: server functions. */
const icon = new LabIcon({
  name: "anvil-nb:icon",
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" d="M13 2 4 14h6l-1 8 9-12h-6l1-8z"/></svg>',
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: "anvil-nb:plugin",
  description: "The Server Functions panel: anvil_nb apps, registries, calls and tasks, live.",
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette],
  activate: (app: JupyterFrontEnd, shell: ILabShell, palette: ICommandPalette | null) => {
    const panel = new ServerFunctionsPanel();
    panel.title.icon = icon;
    shell.add(panel, "left", { rank: 600 });
    app.commands.addCommand(OPEN, {
      label: "Open Server Functions",
      caption: "Show anvil_nb's Server Functions panel",
      execute: () => shell.activateById(panel.id),
    });
    palette?.addItem({ command: OPEN, category: "anvil_nb" });
  },
};

export default plugin;
