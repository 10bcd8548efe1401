// util/text.h: the text helpers the file readers share. Torch-free (the fuzz target links it); messages are
// formatted with fmt (LibTorch ships it; header-only here).
#pragma once

#include <string>
#include <string_view>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace tiedlora::util {

/// "[2, 3]": a shape (any range of numbers: std::vector, at::IntArrayRef) for messages.
template <typename Range>
std::string list_text(const Range& values) {
  return fmt::format("[{}]", fmt::join(values, ", "));
}

inline bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// A name for error messages: in single quotes, printable ASCII kept, every other byte escaped as \xNN,
/// cut after 200 bytes. Untrusted names (from a file being parsed) go through this. `keep_utf8` keeps
/// bytes >= 0x80 as they are (tokens such as "Ġthe" stay readable).
std::string quote_for_message(std::string_view name, bool keep_utf8 = false);

/// `text` for an error message, at most about `limit` characters: a longer text is cut after the last
/// ',' or ' ' before the limit (never inside a word or a JSON string's token) and ends with " ...".
std::string excerpt_for_message(const std::string& text, std::size_t limit = 200);

/// JSON parsing that refuses duplicate keys at any depth (nlohmann keeps the last one silently).
/// Throws tiedlora::FormatError "<source>: not valid JSON (...)" or "<source>: key '<k>' appears twice".
nlohmann::json parse_json_strict(const std::string& text, const std::string& source);

}  // namespace tiedlora::util
