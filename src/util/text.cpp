// util/text.cpp: see util/text.h.
#include "util/text.h"

#include <set>
#include <vector>

#include "tiedlora/core/error.h"

namespace tiedlora::util {

std::string quote_for_message(std::string_view name, bool keep_utf8) {
  std::string out = "'";
  for (unsigned char c : name.substr(0, 200)) {
    const bool plain = c >= 0x20 && c != 0x7f && (c < 0x7f || keep_utf8) && c != '\'' && c != '\\';
    if (plain)
      out += static_cast<char>(c);
    else
      out += fmt::format("\\x{:02x}", c);
  }
  return out + (name.size() > 200 ? "...'" : "'");
}

std::string excerpt_for_message(const std::string& text, std::size_t limit) {
  if (text.size() <= limit) return text;
  std::size_t cut = text.find_last_of(", ", limit);
  if (cut == std::string::npos || cut < limit / 2)
    cut = limit;  // no boundary nearby: cut where it is
  else
    cut += 1;  // keep the ',' itself
  return text.substr(0, cut) + " ...";
}

nlohmann::json parse_json_strict(const std::string& text, const std::string& source) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  nlohmann::json::parser_callback_t callback = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& value) {
    if (event == nlohmann::json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == nlohmann::json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == nlohmann::json::parse_event_t::key && !keys.empty()) {
      if (!keys.back().insert(value.get<std::string>()).second && duplicate.empty())
        duplicate = value.get<std::string>();
    }
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, callback);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(source + ": not valid JSON (" + e.what() + ")");
  }
  if (!duplicate.empty()) throw FormatError(source + ": key " + quote_for_message(duplicate) + " appears twice");
  return j;
}

}  // namespace tiedlora::util
