// util/python_regex.cpp: Python `re` syntax translated to std::regex's ECMAScript (see python_regex.h).
// The scanner follows CPython's sre_parse rule by rule for what it accepts; everything else is refused.
#include "util/python_regex.h"

#include <cctype>
#include <set>
#include <stdexcept>
#include <vector>

namespace tiedlora::util {
namespace {

[[noreturn]] void refuse(const std::string& why, std::size_t position) {
  throw std::invalid_argument(why + " at position " + std::to_string(position));
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_ascii_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// A literal character written so that ECMAScript reads it as itself, outside or inside a class.
std::string literal(char c, bool in_class) {
  static const std::string kSyntax = "^$\\.*+?()[]{}|/";
  static const std::string kClassSyntax = "]\\^-[";
  if ((in_class ? kClassSyntax : kSyntax).find(c) != std::string::npos) return std::string("\\") + c;
  return std::string(1, c);
}

class Translator {
 public:
  Translator(const std::string& pattern, int groups_before) : p_(pattern), groups_(groups_before) {}

  std::string run() {
    for (unsigned char c : p_) {
      if (c < 0x20 || c > 0x7e)
        refuse("only printable ASCII is translated exactly, found byte " + std::to_string(c), 0);
    }
    while (i_ < p_.size()) step();
    if (depth_ != 0) refuse("missing ), unterminated subpattern", p_.size());
    return out_;
  }

 private:
  // What the last item was, for Python's quantifier rules.
  enum class Last { nothing, atom, quantifier, lazy_quantifier };

  void step() {
    const std::size_t at = i_;
    const char c = p_[i_++];
    switch (c) {
      case '(': open_group(at); return;
      case ')':
        if (depth_ == 0) refuse("unbalanced parenthesis", at);
        --depth_;
        out_ += ')';
        // A quantified lookahead ("(?=a)*") is valid Python but pointless: refused (not translated).
        last_ = lookahead_closing_.back() ? Last::nothing : Last::atom;
        lookahead_closing_.pop_back();
        return;
      case '[': char_class(at); return;
      case '\\': escape(at); return;
      case '*':
      case '+':
      case '?': quantifier(std::string(1, c), at); return;
      case '{': brace(at); return;
      case '|':
        out_ += '|';
        last_ = Last::nothing;
        return;
      case '^':
      case '$':
        out_ += c;
        last_ = Last::nothing;
        return;
      case '.':
        out_ += '.';
        last_ = Last::atom;
        return;
      default:
        out_ += literal(c, false);
        last_ = Last::atom;
        return;
    }
  }

  void quantifier(const std::string& q, std::size_t at) {
    if (q == "?" && last_ == Last::quantifier) {  // the lazy form of the quantifier before
      out_ += '?';
      last_ = Last::lazy_quantifier;
      return;
    }
    if (last_ == Last::quantifier || last_ == Last::lazy_quantifier) {
      if (q == "+" && last_ == Last::quantifier) refuse("possessive quantifiers have no ECMAScript equivalent", at);
      refuse("multiple repeat", at);
    }
    if (last_ == Last::nothing) refuse("nothing to repeat", at);
    out_ += q;
    last_ = Last::quantifier;
  }

  // sre_parse: '{' is a quantifier when it reads {digits*[,digits*]}, except "{}"; otherwise a literal.
  void brace(std::size_t at) {
    std::size_t j = i_;
    std::string lo, hi;
    while (j < p_.size() && is_digit(p_[j])) lo += p_[j++];
    bool comma = false;
    if (j < p_.size() && p_[j] == ',') {
      comma = true;
      ++j;
      while (j < p_.size() && is_digit(p_[j])) hi += p_[j++];
    } else {
      hi = lo;
    }
    const bool closed = j < p_.size() && p_[j] == '}';
    if (!closed || (lo.empty() && !comma)) {  // "{", "{x", "{}" and the like are literal braces
      out_ += "\\{";
      last_ = Last::atom;
      return;
    }
    i_ = j + 1;
    if (lo.size() > 9 || hi.size() > 9) refuse("the repeat count is too large", at);
    const std::string min = lo.empty() ? "0" : std::to_string(std::stol(lo));
    if (!hi.empty() && std::stol(hi) < std::stol(min)) refuse("min repeat greater than max repeat", at);
    quantifier("{" + min + (comma ? "," + (hi.empty() ? "" : std::to_string(std::stol(hi))) : "") + "}", at);
  }

  void open_group(std::size_t at) {
    bool lookahead = false;
    if (i_ < p_.size() && p_[i_] == '?') {
      const std::string rest = p_.substr(i_ + 1, 2);
      if (rest.rfind(':', 0) == 0) {
        out_ += "(?:";
        i_ += 2;
      } else if (rest.rfind('=', 0) == 0 || rest.rfind('!', 0) == 0) {
        out_ += std::string("(?") + p_[i_ + 1];
        i_ += 2;
        lookahead = true;
      } else if (rest.rfind("P<", 0) == 0) {
        const std::size_t close = p_.find('>', i_ + 3);
        if (close == std::string::npos) refuse("missing >, unterminated name", at);
        const std::string name = p_.substr(i_ + 3, close - i_ - 3);
        if (name.empty() || is_digit(name[0])) refuse("bad character in group name '" + name + "'", at);
        for (char ch : name) {
          if (!is_ascii_letter(ch) && !is_digit(ch) && ch != '_')
            refuse("bad character in group name '" + name + "'", at);
        }
        if (!names_.insert(name).second) refuse("redefinition of group name '" + name + "'", at);
        i_ = close + 1;
        out_ += '(';  // a named group is a numbered group that also has a name: same matching
        ++groups_;
      } else if (rest.rfind('#', 0) == 0) {
        const std::size_t close = p_.find(')', i_);
        if (close == std::string::npos) refuse("missing ), unterminated comment", at);
        i_ = close + 1;  // a comment matches nothing and leaves the item before it repeatable,
        if (last_ == Last::quantifier) last_ = Last::lazy_quantifier;  // but "a*(?#c)?" is a multiple repeat
        return;
      } else if (rest.rfind("<=", 0) == 0 || rest.rfind("<!", 0) == 0) {
        refuse("lookbehind (?<= / (?<! has no ECMAScript equivalent", at);
      } else if (rest.rfind("P=", 0) == 0) {
        refuse("backreferences are not supported", at);
      } else if (rest.rfind('>', 0) == 0) {
        refuse("atomic groups have no ECMAScript equivalent", at);
      } else if (rest.rfind('(', 0) == 0) {
        refuse("conditional groups have no ECMAScript equivalent", at);
      } else {
        refuse("inline flags and other (?...) extensions are not supported", at);
      }
    } else {
      out_ += '(';
      ++groups_;
    }
    ++depth_;
    lookahead_closing_.push_back(lookahead);
    last_ = Last::nothing;
  }

  // An escape outside a class. Python refuses unknown letter escapes; digits are backreferences or octal.
  void escape(std::size_t at) {
    if (i_ >= p_.size()) refuse("bad escape (end of pattern)", at);
    const char c = p_[i_++];
    last_ = Last::atom;
    switch (c) {
      case 'd':
      case 'D':
      case 'w':
      case 'W':
      case 's':
      case 'S':
        out_ += std::string("\\") + c;  // identical on printable ASCII, the only names matched
        return;
      case 'b':
      case 'B':
        out_ += std::string("\\") + c;
        last_ = Last::nothing;
        return;
      case 'A':
        out_ += '^';
        last_ = Last::nothing;
        return;
      case 'Z':
        out_ += '$';
        last_ = Last::nothing;
        return;
      default: out_ += simple_escape(c, at, false); return;
    }
  }

  // Escapes with the same meaning inside and outside a class: control characters, \xhh, punctuation.
  std::string simple_escape(char c, std::size_t at, bool in_class) {
    switch (c) {
      case 'n': return "\\n";
      case 't': return "\\t";
      case 'r': return "\\r";
      case 'f': return "\\f";
      case 'v': return "\\v";
      case 'a': return "\\x07";
      case 'x': {
        if (i_ + 2 > p_.size() || !std::isxdigit(static_cast<unsigned char>(p_[i_])) ||
            !std::isxdigit(static_cast<unsigned char>(p_[i_ + 1]))) {
          refuse("incomplete escape \\x", at);
        }
        const std::string hex = p_.substr(i_, 2);
        i_ += 2;
        return "\\x" + hex;
      }
      default: break;
    }
    if (is_digit(c)) refuse("backreferences and octal escapes are not supported", at);
    if (is_ascii_letter(c)) refuse(std::string("bad escape \\") + c, at);
    return literal(c, in_class);
  }

  // A character class, sre_parse's rules: ']' first is a literal, '-' last or first is a literal, ranges
  // need literal ends in order.
  void char_class(std::size_t at) {
    std::string body = "[";
    if (i_ < p_.size() && p_[i_] == '^') {
      body += '^';
      ++i_;
    }
    bool first = true;
    for (;;) {
      if (i_ >= p_.size()) refuse("unterminated character set", at);
      const std::size_t item_at = i_;
      if (p_[i_] == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      int low = -1;
      const std::string item = class_item(low);
      if (i_ < p_.size() && p_[i_] == '-') {
        ++i_;
        if (i_ >= p_.size()) refuse("unterminated character set", at);
        if (p_[i_] == ']') {  // "a-]": a literal '-' at the end
          ++i_;
          body += item + "\\-]";
          out_ += body;
          last_ = Last::atom;
          return;
        }
        int high = -1;
        const std::string high_item = class_item(high);
        if (low < 0 || high < 0) refuse("bad character range", item_at);
        if (high < low) refuse("bad character range", item_at);
        body += item + "-" + high_item;
      } else {
        body += item;
      }
    }
    out_ += body + "]";
    last_ = Last::atom;
  }

  // One character of a class, plain or escaped, as ECMAScript text; `code` is the character it stands
  // for, or -1 for a category (\d, \w, ...).
  std::string class_item(int& code) {
    const std::size_t at = i_;
    const char c = p_[i_++];
    if (c == '\\') return class_escape(at, code);
    code = static_cast<unsigned char>(c);
    return literal(c, true);
  }

  // An escape inside a class; `code` is the character it stands for, or -1 for a category (\d, \w, ...).
  std::string class_escape(std::size_t at, int& code) {
    if (i_ >= p_.size()) refuse("unterminated character set", at);
    const char c = p_[i_++];
    code = -1;
    switch (c) {
      case 'd':
      case 'D':
      case 'w':
      case 'W':
      case 's':
      case 'S': return std::string("\\") + c;
      case 'b': code = 8; return "\\x08";  // inside a class \b is a backspace, in both dialects
      default: break;
    }
    const std::string text = simple_escape(c, at, true);
    if (c == 'x')
      code = std::stoi(text.substr(2), nullptr, 16);
    else if (c == 'n')
      code = '\n';
    else if (c == 't')
      code = '\t';
    else if (c == 'r')
      code = '\r';
    else if (c == 'f')
      code = '\f';
    else if (c == 'v')
      code = '\v';
    else if (c == 'a')
      code = 7;
    else
      code = static_cast<unsigned char>(c);
    return text;
  }

  const std::string& p_;
  std::size_t i_ = 0;
  int groups_;
  int depth_ = 0;
  std::vector<bool> lookahead_closing_;
  std::set<std::string> names_;
  Last last_ = Last::nothing;
  std::string out_;
};

std::regex compile(const std::string& ecmascript) {
  try {
    return std::regex(ecmascript, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    // The translation is meant to be valid ECMAScript; if std::regex still refuses, so do we.
    throw std::invalid_argument(std::string("std::regex cannot compile its translation (") + e.what() + ")");
  }
}

}  // namespace

std::string python_to_ecmascript(const std::string& pattern, int groups_before) {
  return Translator(pattern, groups_before).run();
}

std::regex compile_peft_key_pattern(const std::string& pattern) {
  return compile("(.*\\.)?(" + python_to_ecmascript(pattern, 2) + ")$");
}

std::regex compile_python_fullmatch(const std::string& pattern) {
  return compile("(?:" + python_to_ecmascript(pattern, 0) + ")");
}

}  // namespace tiedlora::util
