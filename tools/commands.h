// tools/commands.h: the subcommands of the `tiedlora` tool. Each registers itself on the CLI11 app and
// returns the callback that runs it.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace tiedlora::tools {

using Command = std::function<int()>;

/// `tiedlora params`: trainable-parameter counts from a config.json, no weights loaded.
Command add_params_command(CLI::App& app);
/// `tiedlora merge-weights`: an adapter merged into a base checkpoint, streamed.
Command add_merge_command(CLI::App& app);
/// `tiedlora export-lora`: the per-layer LoRA equivalent of a Tied-LoRA adapter.
Command add_export_command(CLI::App& app);
/// `tiedlora generate`: greedy generation with a model and its tokenizer.
Command add_generate_command(CLI::App& app);
/// `tiedlora tokenize`: token ids of a text file.
Command add_tokenize_command(CLI::App& app);
/// `tiedlora inspect`: tensors, metadata and adapter config of a file or folder.
Command add_inspect_command(CLI::App& app);

/// `tiedlora plot`: loss curves of metrics.jsonl files in one PNG.
Command add_plot_command(CLI::App& app);

}  // namespace tiedlora::tools
