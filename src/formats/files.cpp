// files.cpp: the public face (tiedlora/formats/files.h) of the libraries' private file helpers (util/files.h),
// for programs, which include public headers only.
#include "tiedlora/formats/files.h"

#include "util/files.h"

namespace tiedlora::formats {

bool path_exists(const std::string& path) { return util::path_exists(path); }
bool is_directory(const std::string& path) { return util::is_directory(path); }
bool is_regular_file(const std::string& path) { return util::is_regular_file(path); }
std::string join_path(const std::string& folder, const std::string& name) { return util::join_path(folder, name); }
std::string read_text_file(const std::string& path) { return util::read_text_file(path); }
void remove_tree(const std::string& path) { util::remove_tree(path); }

void write_text_file(const std::string& path, const std::string& text) {
  util::write_file_atomically(path, [&](const util::ByteWriter& write) { write(text.data(), text.size()); });
}

}  // namespace tiedlora::formats
